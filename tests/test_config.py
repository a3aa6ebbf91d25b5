"""Config loading (dist_triplet/config.py): what the YAML loader refuses and how it says so.
Bad values through the command line are in tests/test_bad_input.py."""
import pytest

from dist_triplet.config import ConfigError, load_config


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
    from dist_triplet.config import Config
    old = Config()
    new = Config()
    section, name = key.split(".")
    value = getattr(getattr(old, section), name)
    changed = {bool: lambda v: not v, int: lambda v: v + 7, float: lambda v: v + 0.5,
               str: lambda v: v + "x", list: lambda v: v + [3], type(None): lambda v: "x"}
    setattr(getattr(new, section), name, changed[type(value)](value))
    if policy == "fixed":
        with pytest.raises(ValueError, match=f"cannot resume from ck: {key} was "):
            check_compatible(_meta_for(old), new.to_dict(), "ck", processes=1, devices=1)
    else:
        warned = check_compatible(_meta_for(old), new.to_dict(), "ck", processes=1, devices=1)
        expect = [f"{key}: {value!r} -> {getattr(getattr(new, section), name)!r}"]
        assert warned == (expect if policy == "schedule" else [])
