"""Import weight: ``hf-useg --help`` answers before importing torch/transformers, the package's public names are
imported on first access, and a bare ``import hf_useg`` still registers every method with the Auto classes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hf_useg

HEAVY = ("torch", "transformers", "datasets", "numpy", "PIL")


def _python(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=timeout
    )


# the `hf-useg` console script: `sys.argv[0]` is its path, then `from hf_useg.cli import main; main()`
_AS_CONSOLE_SCRIPT = """
import sys
sys.argv = ["/somewhere/bin/hf-useg", *{argv!r}]
from hf_useg.cli import main
try:
    main()
except SystemExit as exit:
    print("exit", exit.code, file=sys.stderr)
print(sorted(name for name in {heavy!r} if name in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["evaluate", "--help"], ["evaluate"], ["no-such-command"], []])
def test_cli_parses_before_importing_anything_heavy(argv):
    result = _python(_AS_CONSOLE_SCRIPT.format(argv=argv, heavy=HEAVY))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout  # no torch, transformers, ...
    if argv and argv[-1] == "--help":
        assert "usage: hf-useg" in result.stdout and "exit 0" in result.stderr
    elif argv:
        assert "exit 2" in result.stderr  # argparse's usage error


def test_console_script_help():
    script = Path(sys.executable).with_name("hf-useg")
    if not script.is_file():
        pytest.skip("the hf-useg console script is not installed beside this interpreter")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("evaluate", "demo", "push", "convert"):
        assert command in result.stdout


def test_cli_registers_before_running_a_command():
    """A command (after parsing) finds the Auto classes registered, as after ``import hf_useg``."""
    result = _python(
        """
        import sys
        sys.argv = ["hf-useg"]
        import hf_useg, hf_useg.cli
        assert not hf_useg._registered and "torch" not in sys.modules
        seen = []
        hf_useg.cli.cmd_demo = lambda args: seen.append(hf_useg._registered) or 0  # run nothing
        assert hf_useg.cli.main(["demo"]) == 0 and seen == [True]
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        assert "stego" in CONFIG_MAPPING
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_bare_import_registers_the_auto_classes(tmp_path):
    from transformers import ViTConfig

    from hf_useg import StegoConfig, StegoForUnsupervisedSegmentation
    from hf_useg.image_processing import whole_image_processor

    tiny = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32
    )
    StegoForUnsupervisedSegmentation(StegoConfig(backbone_config=tiny, dim=8, num_classes=3)).save_pretrained(tmp_path)
    whole_image_processor(32, 8).save_pretrained(tmp_path)
    result = _python(
        f"""
        import hf_useg
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation, pipeline
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from hf_useg.registry import methods

        assert all(spec.model_type in CONFIG_MAPPING for spec in methods().values())
        folder = {str(tmp_path)!r}
        assert type(AutoConfig.from_pretrained(folder)).__name__ == "StegoConfig"
        assert type(AutoModel.from_pretrained(folder)).__name__ == "StegoForUnsupervisedSegmentation"
        assert type(AutoModelForSemanticSegmentation.from_pretrained(folder)).__name__ == (
            "StegoForUnsupervisedSegmentation"
        )
        assert type(AutoImageProcessor.from_pretrained(folder)).__name__ == "UnsupervisedSegmentationImageProcessor"
        segmenter = pipeline("image-segmentation", model=folder)
        assert type(segmenter.model).__name__ == "StegoForUnsupervisedSegmentation"
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "ok", result.stderr


def test_public_names_are_lazy_and_all_importable():
    result = _python(
        """
        import sys
        sys.argv = ["hf-useg"]  # no registration: only what the names themselves need is imported
        import hf_useg
        assert "torch" not in sys.modules and "hf_useg.models.stego" not in sys.modules
        from hf_useg import StegoConfig
        assert StegoConfig.model_type == "stego" and "hf_useg.models.iic" not in sys.modules
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    for name in hf_useg.__all__:
        assert getattr(hf_useg, name).__name__ == name
        assert name in dir(hf_useg)
    namespace: dict = {}
    exec("from hf_useg import *", namespace)
    assert set(hf_useg.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        hf_useg.NoSuchName  # noqa: B018


def test_data_and_hub_keep_their_public_names():
    import hf_useg.data as data
    import hf_useg.hub as hub

    for name in data.__all__ + hub.__all__:
        assert hasattr(data if name in data.__all__ else hub, name), name
    assert {"load_segmentation_dataset", "segmentation_metadata", "label_to_tensor", "check_label_sizes"} <= set(
        data.__all__
    )
    assert set(hub.__all__) == {
        "card_eval_results",
        "generate_model_card",
        "model_card_from_folder",
        "push_model_folder",
        "push_space_folder",
        "validate_model_card",
    }
