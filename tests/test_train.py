"""The training command line (dist_triplet/train.py): --print-config, --help, and bad
input before MXNet starts."""
import subprocess
import sys

import yaml

from _hvd import ROOT, child_env
from dist_triplet.config import load_config
from dist_triplet.train import main


def _run(*args):
    code = ("import sys; from dist_triplet.train import main; rc = main(sys.argv[1:]); "
            "print('MXNET', 'mxnet' in sys.modules, file=sys.stderr); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)


def test_print_config_is_the_resolved_config_and_imports_no_mxnet():
    proc = _run("--config", "configs/fashion_mnist_global_mining.yaml", "--print-config",
                "train.epochs=3")
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(proc.stdout)
    expected = load_config("configs/fashion_mnist_global_mining.yaml", ["train.epochs=3"])
    assert doc == expected.to_dict()
    assert (doc["sampler"]["scope"], doc["sampler"]["k"], doc["optim"]["optimizer"],
            doc["train"]["epochs"]) == ("global", 8, "adam", 3)   # base, default, base, override
    assert "MXNET False" in proc.stderr                           # no training started
    assert "epoch" not in proc.stderr.replace("epochs", "")


def test_help_points_at_the_key_reference(capsys):
    import pytest
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--print-config" in out and "dist_triplet/config.py" in out and "docs/data.md" in out


def test_bad_key_is_one_line_and_exit_2_without_mxnet():
    proc = _run("train.epoch=3")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "unknown key 'train.epoch'" in lines[0]
    assert "MXNET False" in proc.stderr
