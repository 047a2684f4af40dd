"""Every shipped reference recipe rebuilds its Keras architecture with the exact parameter count."""

import importlib
import json

import pytest
import torch

from imgclf.config import DEFAULT, describe_settings, list_recipes, load_recipe, parse_settings
from imgclf.data import dataset_info
from imgclf.errors import ImgclfError
from imgclf.models import count_params, create_model

# Trainable parameter counts of the classic Keras notebooks these recipes rebuild.
REFERENCE_TRAINABLE = {
    "ref-mnist-cnn": 128_266,
    "ref-fashion-cnn": 2_759_850,
    "ref-cifar10-cnn": 4_071_146,
    "ref-cifar100-coarse-cnn": 4_073_716,
    "ref-cifar100-tuned-cnn": 10_681_188,
    "ref-cifar10-lenet": 2_233_898,
    "ref-cifar10-lenet-deep": 1_668_906,
    "ref-cifar100-mlp": 1_887_332,
    "ref-cifar100-small-cnn": 249_892,
    "ref-cifar100-vgg-bn": 15_786_340,
    "ref-cifar100-vgg16-transfer": 51_300,
    "ref-cifar10-gray-cnn": 535_658,
    "ref-cifar10-gray-tuned-cnn": 2_267_338,
}


def build(recipe: str):
    config = load_recipe(recipe)
    info = dataset_info(config.data.dataset)
    channels = 1 if config.data.grayscale else info.channels
    options = {k: v for k, v in config.model.options.items() if k != "weights"}  # counts: ImageNet's not fetched
    return create_model(config.model.name, num_classes=info.num_classes, in_channels=channels,
                        image_size=info.image_size, **options)


@pytest.mark.parametrize("recipe", sorted(REFERENCE_TRAINABLE))
def test_reference_recipe_parameter_count(recipe):
    trainable, _ = count_params(build(recipe))
    assert trainable == REFERENCE_TRAINABLE[recipe]


def test_vgg16_transfer_total_parameters():
    assert count_params(build("ref-cifar100-vgg16-transfer")) == (51_300, 14_765_988)


@pytest.mark.parametrize("recipe", [name for name, _ in list_recipes()])
def test_every_shipped_recipe_loads_and_builds(recipe):
    config = load_recipe(recipe)
    assert config.description
    build(recipe)


FAST_RECIPES = ["mnist-fast", "fashion-fast", "cifar10-fast", "cifar10-long", "cifar100-fast", "cifar100-coarse-fast"]


@pytest.mark.parametrize("recipe", FAST_RECIPES)
def test_fast_recipe_runs_end_to_end_on_tiny_canonical_files(recipe, tmp_path, monkeypatch):
    """Each fast recipe trains and evaluates on small files in its dataset's canonical format (no real data)."""
    from test_data import make_cifar10, make_cifar100, make_mnist, trust

    from imgclf import evaluate, train

    dataset = load_recipe(recipe).data.dataset
    folder = tmp_path / ("cifar100" if dataset.startswith("cifar100") else dataset)
    {"mnist": make_mnist, "fashion-mnist": make_mnist, "cifar10": make_cifar10}.get(dataset, make_cifar100)(folder)
    trust(monkeypatch, dataset, folder)
    # One short epoch at a small batch: the recipe's model, optimizer, schedule, augmentation and TTA all run.
    result = train(recipe=recipe, data_dir=str(tmp_path), epochs=1, batch_size=16, out=tmp_path / "run", quiet=True)
    metrics = evaluate(result.run_dir)
    assert metrics["num_images"] == {"mnist": 20, "fashion-mnist": 20, "cifar10": 30}.get(dataset, 100)
    assert len(metrics["confusion_matrix"]) == dataset_info(dataset).num_classes
    assert metrics["tta"] == load_recipe(recipe).train.tta


def test_recipe_base_supplies_every_option_the_recipe_does_not_give(tmp_path):
    (tmp_path / "base.yaml").write_text("data: {dataset: mnist, val_split: 0.1}\n"
                                        "model: {name: fastnet, widths: [8, 16, 16]}\ntrain: {epochs: 3, lr: 0.5}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {epochs: 7}\n")
    (tmp_path / "other_model.yaml").write_text("base: base.yaml\nmodel: {name: mlp}\n")
    child = load_recipe(tmp_path / "child.yaml")
    assert (child.train.epochs, child.train.lr, child.data.val_split) == (7, 0.5, 0.1)
    assert child.model.options == {"widths": [8, 16, 16]}
    assert load_recipe(tmp_path / "other_model.yaml").model.options == {}  # fastnet's widths are not the mlp's


def test_shipped_cifar100_recipes_are_cifar10_fast_on_their_dataset():
    fast = load_recipe("cifar10-fast")
    for name, dataset in [("cifar100-fast", "cifar100"), ("cifar100-coarse-fast", "cifar100-coarse")]:
        config = load_recipe(name)
        assert (config.recipe, config.data.dataset, config.model) == (name, dataset, fast.model)
        assert config.train.optimizer == fast.train.optimizer and config.train.muon_lr == fast.train.muon_lr


def test_recipe_base_cycle_is_a_one_line_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ImgclfError, match="its own base"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ImgclfError, match="does not exist"):
        load_recipe(tmp_path / "c.yaml")


def test_recipe_base_lends_its_sections_not_its_description(tmp_path):
    (tmp_path / "child.yaml").write_text("base: cifar10-fast\ntrain: {lr: 0.5}\n")
    child = load_recipe(tmp_path / "child.yaml")
    assert (child.description, child.recipe, child.train.lr) == ("", str(tmp_path / "child.yaml"), 0.5)


def test_recipe_base_path_without_suffix_is_relative_to_the_recipe(tmp_path, monkeypatch):
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "small.yaml").write_text("train: {epochs: 3}\n")
    (tmp_path / "child.yaml").write_text("base: bases/small\ntrain: {lr: 0.5}\n")
    monkeypatch.chdir(tmp_path / "bases")  # not the folder the base is relative to
    child = load_recipe(tmp_path / "child.yaml")
    assert (child.train.epochs, child.train.lr) == (3, 0.5)


def test_recipe_values_are_read_as_their_option_types(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {lr: 1e-3, warmup_epochs: 1, epochs: 2.0, augment: 'crop,flip'}\n")
    train = load_recipe(recipe).train  # YAML reads 1e-3 as a string; the option is a float
    assert (train.lr, train.warmup_epochs, train.epochs, train.augment) == (1e-3, 1.0, 2, ["crop", "flip"])


@pytest.mark.parametrize("body, problem", [
    ("train: {epochs: ten}", "option epochs is 'ten', which is not a whole number"),
    ("train: {epochs: 1.5}", "option epochs is 1.5, which is not a whole number"),
    ("data: {val_split: a tenth}", "option val_split is 'a tenth', which is not a finite number"),
    ("train: {augment: 5}", "option augment is 5, which is not a list of names"),
    ("train: {lookahead: 1}", "option lookahead is 1, which is not true or false"),
    ("model: mlp", "model must be a mapping such as {name: cnn}, not 'mlp'"),
    ("model: {name: [mlp]}", "model name ['mlp'] is not a name; write e.g. name: cnn"),
    ("description: 5", "description 5 is not text"),
    ("recipe: [x]", "recipe ['x'] is not text"),
    ("train: {momentum: -1}", "invalid momentum -1.0; use a value in [0, 1)"),
    ("train: {schedule: step, step_size: 0}", "invalid step_size 0"),
    ("train: {early_stopping: -1}", "invalid early stopping patience -1"),
    ("train: {warmup_epochs: -2}", "invalid warm-up epochs -2.0"),
    ("train: {crop_padding: -3}", "invalid crop_padding -3"),
    ("train: {cutout_size: 0}", "invalid cutout_size 0"),
])
def test_a_recipe_value_of_the_wrong_type_or_range_is_a_one_line_error(tmp_path, body, problem):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(body + "\n")
    with pytest.raises(ImgclfError) as error:
        load_recipe(recipe)
    assert problem in str(error.value) and "\n" not in str(error.value)


def test_settings_are_described_as_set_takes_them():
    assert describe_settings({"subset": None, "tta": True, "lr": 0.003162, "model.filters": [8, 16]}) == (
        "subset=null tta=true lr=0.00316 model.filters=[8,16]")
    assert parse_settings(["subset=null", "tta=true"]) == {"subset": DEFAULT, "tta": True}  # the default: None


def test_an_empty_section_over_a_base_changes_nothing(tmp_path):
    (tmp_path / "my.yaml").write_text("base: mnist-fast\ndata: {dataset: digits}\nmodel:\n  # widths: [8]\n"
                                      "train:\n  # epochs: 1\n")
    config, base = load_recipe(tmp_path / "my.yaml"), load_recipe("mnist-fast")
    assert (config.model, config.train, config.data.dataset) == (base.model, base.train, "digits")


def test_set_null_means_the_default_and_drops_a_model_option():
    from imgclf.config import TrainConfig, make_config

    settings = parse_settings(["early_stopping=null", "lr=null", "model.weights=null", "model.dense=[7]"])
    config = make_config("ref-cifar100-vgg16-transfer", **settings)
    assert config.train.early_stopping is None and config.train.lr == TrainConfig().lr
    assert "weights" not in config.model.options and config.model.options["dense"] == [7]
    assert make_config("cifar10-fast", model="cnn", **parse_settings(["whiten_bias_epochs=null"]))


def test_a_yaml_error_says_where(tmp_path):
    (tmp_path / "tabs.yaml").write_text("data:\n  dataset: digits\n\tepochs: 1\n")
    with pytest.raises(ImgclfError, match=r"not valid YAML at line 3, column 1: found character '\\t'"):
        load_recipe(tmp_path / "tabs.yaml")
    (tmp_path / "twice.yaml").write_text("data: {dataset: digits}\nmodel: {name: mlp}\ndata: {dataset: mnist}\n")
    with pytest.raises(ImgclfError, match="not valid YAML at line 3, column 1: found the key 'data' twice"):
        load_recipe(tmp_path / "twice.yaml")
    (tmp_path / "merged.yaml").write_text("data: {<<: {dataset: digits, val_split: 0.2}, dataset: mnist}\n")
    assert load_recipe(tmp_path / "merged.yaml").data.dataset == "mnist"  # a merge key's keys may be given again
    with pytest.raises(ImgclfError, match=r"mnist-fast.yaml does not exist; check the path \(the shipped recipe is "
                                          r"mnist-fast, without .yaml\)"):
        load_recipe("mnist-fast.yaml")
    (tmp_path / "keys.yaml").write_text("model: {name: cnn, 1: 2}\n")
    with pytest.raises(ImgclfError, match="model option 1 is not an option name"):
        load_recipe(tmp_path / "keys.yaml")


def test_model_options_read_like_train_options():
    assert create_model("mlp", dropout="1e-1", image_size=8, in_channels=1)  # YAML 1.1 leaves 1e-1 a string
    for options, message in (({"bn_momentum": "abc"}, "option bn_momentum must be in"),
                             ({"logit_scale": 0}, "option logit_scale must be a positive number")):
        with pytest.raises(ImgclfError, match=message):
            create_model("fastnet", **options)


def test_vgg_transfer_from_a_run_with_weights_beside_the_recipe(tmp_path, monkeypatch):
    import warnings

    from safetensors.torch import save_file

    from imgclf import train

    source = create_model("vgg", layout=[8, "M", 16, "M"], num_classes=3, in_channels=1, image_size=8)
    save_file(source.state_dict(), tmp_path / "run_weights.safetensors")  # features.* and the head, as a run's
    (tmp_path / "transfer.yaml").write_text(
        "data: {dataset: digits}\nmodel: {name: vgg, layout: [8, M, 16, M], freeze_features: true, dense: [],\n"
        "  weights: run_weights.safetensors}\ntrain: {epochs: 1}\n")
    monkeypatch.chdir(tmp_path.parent)  # the weights are found beside the recipe, not in the working folder
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "random frozen base" warning: the base has weights
        run = train(recipe=str(tmp_path / "transfer.yaml"), out=tmp_path / "run", quiet=True)
    assert torch.equal(run.model.features[0].weight, source.features[0].weight)
    assert train(recipe=str(tmp_path / "transfer.yaml"), out=tmp_path / "run", quiet=True).reused
    source.features[0].weight.data += 1  # a new base in the same file: the same command must not reuse the run
    save_file(source.state_dict(), tmp_path / "run_weights.safetensors")
    with pytest.raises(ImgclfError, match="run_weights.safetensors changed since .* was trained from it"):
        train(recipe=str(tmp_path / "transfer.yaml"), out=tmp_path / "run", quiet=True)
    interrupted = {"calls": 0}

    def stop_in_epoch_2(*args, **kwargs):
        interrupted["calls"] += 1
        if interrupted["calls"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    train_module = importlib.import_module("imgclf.train")
    real_epoch = train_module.train_one_epoch
    monkeypatch.setattr(train_module, "train_one_epoch", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(recipe=str(tmp_path / "transfer.yaml"), out=tmp_path / "stopped", quiet=True, epochs=2)
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    started_from = json.loads((tmp_path / "stopped" / "model.json").read_text())["weights_md5"]
    (tmp_path / "run_weights.safetensors").rename(tmp_path / "moved.safetensors")  # resuming needs no base
    train(out=tmp_path / "stopped", resume=True, quiet=True)
    assert json.loads((tmp_path / "stopped" / "model.json").read_text())["weights_md5"] == started_from
    (tmp_path / "moved.safetensors").rename(tmp_path / "run_weights.safetensors")
    relative = f"{tmp_path.name}/run_weights.safetensors"  # from the working folder, as --set gives it
    again = train(recipe=str(tmp_path / "transfer.yaml"), out=tmp_path / "rel", quiet=True,
                  model_options={"weights": relative})
    assert load_recipe(again.run_dir / "config.yaml").model.options["weights"] == str(
        tmp_path / "run_weights.safetensors")  # recorded absolute: the run reads the same file from anywhere
    with pytest.warns(UserWarning, match="freeze_features without weights: the frozen conv base is random"):
        train(recipe=str(tmp_path / "transfer.yaml"), out=tmp_path / "random", quiet=True,
              model_options={"weights": None})


def test_a_config_changed_in_python_is_typed_or_refused_in_one_line():
    config = load_recipe("mnist-fast")
    config.train.lr, config.train.augment = "1e-3", "crop"
    config.validate()
    assert config.train.lr == 0.001 and config.train.augment == ["crop"]
    config.train.epochs = "2"
    with pytest.raises(ImgclfError, match="option epochs is '2', which is not a whole number"):
        config.validate()


def test_none_goes_alone_in_a_list_of_augmentations():
    from imgclf.config import make_config

    assert make_config(model="mlp", dataset="digits", augment="none").train.augment == []
    with pytest.raises(ImgclfError, match="option augment is 'none,crop', but none means no augment: give it alone"):
        make_config(model="mlp", dataset="digits", augment="none,crop")


def test_a_reset_of_an_option_the_model_does_not_have_is_refused():
    from imgclf.config import make_config

    assert "widths" not in make_config("fashion-fast", model_options={"widths": DEFAULT}).model.options
    with pytest.raises(ImgclfError, match="unknown option 'widht' for model fastnet .*did you mean 'widths'"):
        make_config("fashion-fast", model_options={"widht": DEFAULT})


def test_differing_settings_names_each_difference_as_a_recipe_writes_it():
    from imgclf.config import differing_settings

    old = {"train": {"ema": None, "tta": False, "lr": 0.1, "epochs": 1}, "model": {"name": "mlp"}}
    new = {"train": {"ema": 0.999, "tta": True, "lr": 0.1, "epochs": 2}, "model": {"name": "mlp", "dense": [8]}}
    assert differing_settings(old, new) == ("train.ema null there, 0.999 here; train.tta false there, true here; "
                                            "train.epochs 1 there, 2 here; model.dense unset there, [8] here")
    assert differing_settings(old, new, limit=2).endswith("train.tta false there, true here; 2 more")
