"""Config loading (dist_triplet/config.py): what the YAML loader refuses and how it says so.
Bad values through the command line are in tests/test_bad_input.py."""
import dataclasses
import os
import re

import pytest

from dist_triplet.config import Config, ConfigError, load_config


@pytest.mark.parametrize("text, key, line, first", [
    ("train:\n  epochs: 1\ntrain:\n  batch_size: 4\n", "'train'", 3, 1),
    ("train:\n  epochs: 1\n  batch_size: 4\n  epochs: 2\n", "'epochs'", 4, 2),
])
def test_duplicate_yaml_keys_name_file_key_and_line(text, key, line, first, tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: line {line}: duplicate key {key}"), msg
    assert f"first given on line {first}" in msg


@pytest.mark.parametrize("text, line, needle", [
    ("# comment\ntrain:\n  epochs: 1\n\n  epoch: 2\n", 5, "unknown key 'train.epoch'"),
    ("train:\n  epochs: 1\nevall:\n  batch_size: 8\n", 4, "unknown section 'evall'"),
    ("model:\n  hidden: [8]\ntrain:\n  epochs: two\n", 4,
     "train.epochs must be an integer, got 'two'"),
    ("train: 3\n", 1, "section 'train' must be a mapping"),
    # Adversarial trial: a number in a file for a string key was str() of YAML's reading.
    ("output:\n  dir: 2024.10\n", 2,
     "output.dir must be a string, got 2024.1 (YAML read the text as a number: put it in"),
    ("distributed:\n  devices: 010\n", 2, "distributed.devices must be a string, got 8"),
])
def test_yaml_key_errors_name_file_and_line(text, line, needle, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: line {line}: "), msg
    assert needle in msg, msg


def test_same_key_in_different_sections_is_fine(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("train:\n  batch_size: 4\neval:\n  batch_size: 8\n")
    cfg = load_config(str(path))
    assert (cfg.train.batch_size, cfg.eval.batch_size) == (4, 8)


@pytest.mark.parametrize("override, needle", [
    ("train.seed=-1", "train.seed=-1 must be >= 0"),
    ("eval.triplet_seed=-3", "eval.triplet_seed=-3 must be >= 0"),
    ("output.dir=", "output.dir='' is empty"),
    ("output.root=", "output.root='' is empty"),
])
def test_range_checks_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(None, [override])


@pytest.mark.parametrize("override, needle", [
    ("sampler.p=1", "sampler.p=1 must be >= 2"),
    ("sampler.k=1", "sampler.k=1 must be >= 2"),
])
def test_pk_needs_p_and_k_at_least_2(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, ["sampler.kind=pk", override])
    load_config(None, [override])  # irrelevant to the offline sampler


# ----------------------------------------------------------------------------- resume policy

def _flat_fields():
    import dataclasses
    from dist_triplet.config import Config
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            yield f"{section.name}.{f.name}", f


def test_every_config_field_declares_a_resume_policy():
    from dist_triplet.config import resume_policies
    fields = dict(_flat_fields())
    assert len(fields) > 30
    for key, f in fields.items():
        assert f.metadata.get("resume") in ("fixed", "schedule", "free"), key
    assert resume_policies() == {k: f.metadata["resume"] for k, f in fields.items()}


def _meta_for(cfg):
    from dist_triplet.checkpoint import CheckpointMeta
    return CheckpointMeta(epoch=0, config=cfg.to_dict(), world_size=1, processes=1, devices=1)


@pytest.mark.parametrize("key, policy", [(k, f.metadata["resume"]) for k, f in _flat_fields()])
def test_resume_policy_of_each_key_is_enforced(key, policy):
    """Change one key from its default: a "fixed" key is refused naming it, a "schedule"
    key comes back as a warning "key: old -> new", a "free" key passes silently."""
    from dist_triplet.checkpoint import check_compatible
    from dist_triplet.config import Config, load_config
    old = Config()
    if key == "model.channels":       # compared only where it builds the network
        old = load_config(None, ["model.backbone=convnet"])
    section, name = key.split(".")
    value = getattr(getattr(old, section), name)
    changed = {bool: lambda v: not v, int: lambda v: v + 7, float: lambda v: v + 0.5,
               str: lambda v: v + "x", list: lambda v: v + [3], type(None): lambda v: "x"}
    new = old.to_dict()
    new[section][name] = changed[type(value)](value)
    if policy == "fixed":
        with pytest.raises(ValueError, match=f"cannot resume from ck: {key} was "):
            check_compatible(_meta_for(old), new, "ck", processes=1, devices=1)
    else:
        warned = check_compatible(_meta_for(old), new, "ck", processes=1, devices=1)
        expect = [f"{key}: {value!r} -> {new[section][name]!r}"]
        assert warned == (expect if policy == "schedule" else [])


# ----------------------------------------------------------------------------- declared checks

@pytest.mark.parametrize("override, needle", [
    ("optim.optimizer=rmsprop", "optim.optimizer='rmsprop' is not one of sgd, adam"),
    ("distributed.backend=mpi", "is not one of auto, local, horovod, kvstore"),
    ("train.epochs=0", "train.epochs=0 must be > 0"),
    ("optim.lr=0", "optim.lr=0.0 must be > 0"),
    ("data.test_fraction=1", "data.test_fraction=1.0 must lie strictly between 0 and 1"),
    ("eval.query_seed=4294967296", "eval.query_seed=4294967296 must be < 2**32"),
    ("data.limit_train=-1", "data.limit_train=-1 must be >= 0"),
])
def test_choices_and_bounds_come_from_the_fields(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(None, [override])


def test_range_errors_name_the_command_line_or_the_file_and_line(tmp_path):
    """A value out of range named the config file even when it came from an override
    (``--config f.yaml train.epochs=-1`` said "f.yaml: ..."); a file's value gets its line."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 4\n  epochs: -2\nsampler:\n  kind: pk\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: line 3: train.epochs=-2 must be > 0"
    for override, want in (("train.epochs=-1", "train.epochs=-1 must be > 0"),
                           ("sampler.p=1", "sampler.p=1 must be >= 2"),
                           ("sampler.kind=foo", "sampler.kind='foo' is not one of offline, pk")):
        with pytest.raises(ConfigError) as info:
            load_config(str(path), ["train.epochs=3", override])
        assert str(info.value).startswith(f"command line: {want}")
    path.write_text("sampler:\n  kind: pk\n  p: 1\n")
    with pytest.raises(ConfigError) as info:       # relations: where the first key was given
        load_config(str(path), ["sampler.k=3"])
    assert str(info.value).startswith(f"{path}: line 3: sampler.p=1 must be >= 2")


def test_every_choice_and_bound_is_declared_on_its_field():
    fields = dict(_flat_fields())
    assert fields["sampler.kind"].metadata["choices"] == ("offline", "pk")
    assert fields["train.batch_size"].metadata["above"] == 0
    assert fields["checkpoint.keep"].metadata["least"] == 0
    # Every declared default passes its own checks.
    for key, f in fields.items():
        md, value = f.metadata, Config().to_dict()[key.split(".")[0]][key.split(".")[1]]
        assert "choices" not in md or value in md["choices"], key
        assert "least" not in md or value >= md["least"], key
        assert "above" not in md or value > md["above"], key


def test_config_is_frozen_after_load():
    cfg = load_config(None, ["optim.lr=0.01"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim = None
    assert cfg.optim.lr == 0.01


# ----------------------------------------------------------------------------- base files

def test_base_file_applies_first_and_the_file_wins(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text("optim: {lr: 0.2, optimizer: adam}\n"
                                                "train: {epochs: 3}\n")
    (tmp_path / "mid.yaml").write_text("base: sub/base.yaml\ntrain: {epochs: 4}\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\noptim: {lr: 0.3}\n")
    cfg = load_config(str(tmp_path / "top.yaml"), ["train.batch_size=8"])
    assert (cfg.optim.lr, cfg.optim.optimizer, cfg.train.epochs, cfg.train.batch_size) \
        == (0.3, "adam", 4, 8)
    assert cfg.output.name == "top"                     # named after the file given


def test_base_errors_name_file_and_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("train: {epochs: 2}\nbase: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: line 2: base files include each other \(a.yaml -> b.yaml -> "
                                          r"a.yaml\)"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("train: {epochs: 2}\nbase: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: line 2: base file 'missing.yaml' not found"):
        load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("base: c2.yaml\n")
    (tmp_path / "c2.yaml").write_text("train:\n  epochs: two\n")
    with pytest.raises(ConfigError, match=r"c2.yaml: line 2: train.epochs must be an integer"):
        load_config(str(tmp_path / "d.yaml"))


def test_shipped_configs_hold_only_what_differs_from_their_base():
    """configs/*.yaml: each key differs from what the defaults (and the base) give."""
    import glob
    import yaml
    from dist_triplet.config import flat_dict
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    for path in sorted(glob.glob(os.path.join(root, "*.yaml"))):
        with open(path) as fh:
            doc = yaml.safe_load(fh) or {}
        base = doc.pop("base", None)
        below = (load_config(os.path.join(root, base)) if base else Config()).to_dict()
        for key, value in flat_dict(doc).items():
            section, name = key.split(".")
            assert below[section][name] != value, (path, key, value)
        load_config(path)


def test_commented_out_section_and_yaml_merge_keys(tmp_path):
    """Adversarial trial: a section whose keys are all commented out was "not a mapping";
    a YAML merge key (<<: *anchor) failed in the duplicate-key check."""
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  # every: 5\ntrain:\n  epochs: 3\n")
    assert load_config(str(path)).train.epochs == 3
    path.write_text("optim:\n  <<: {momentum: 0.5, lr: 0.2}\n  lr: 0.01\n")
    cfg = load_config(str(path))
    assert (cfg.optim.momentum, cfg.optim.lr) == (0.5, 0.01)    # the explicit key wins
    path.write_text("optim:\n  <<: {momentum: 0.5}\n  lr: 0.01\n  lr: 0.02\n")
    with pytest.raises(ConfigError, match="line 4: duplicate key 'lr'"):
        load_config(str(path))


def test_a_home_relative_path_is_expanded():
    """Second trial: output.dir=~/runs/x (the shell expands no ~ after "key=") ran in
    ./~/runs/x."""
    cfg = load_config(None, ["output.dir=~/runs/x", "data.path=~/d.npz", "output.name=a~b"])
    home = os.path.expanduser("~")
    assert (cfg.output.dir, cfg.data.path) == (f"{home}/runs/x", f"{home}/d.npz")
    assert cfg.output.name == "a~b"
