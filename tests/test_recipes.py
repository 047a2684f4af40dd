"""Every shipped reference recipe rebuilds its Keras architecture with the exact parameter count."""

import pytest

from imgclf.config import describe_settings, list_recipes, load_recipe, parse_settings
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
    return create_model(config.model.name, num_classes=info.num_classes, in_channels=channels,
                        image_size=info.image_size, **config.model.options)


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
    assert parse_settings(["subset=null", "tta=true"]) == {"subset": None, "tta": True}
