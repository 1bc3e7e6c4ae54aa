"""Packaging for the kohya-style Stable Diffusion training toolkit.

torch is deliberately not a hard requirement: install the build that fits your machine first
(``pip install torch==2.13.0`` for CPU), then ``pip install -e .[test]``.
"""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def requirements(name: str) -> list[str]:
    lines = (HERE / name).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="sdtrain-kohya-style",
    version="0.1.0",
    description="kohya-compatible LoRA / DreamBooth / fine-tune training scripts for Stable Diffusion",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "library", "library.args", "library.config", "library.data", "library.families", "library.models",
        "library.prep", "library.sampling", "library.training", "library.utils", "networks", "finetune", "tools",
    ],
    package_data={"library.models": ["configs/*.json"]},
    py_modules=["train_network", "sdxl_train_network", "sd3_train_network", "train_db", "fine_tune", "gen_img"],
    install_requires=requirements("requirements.txt"),
    extras_require={
        "test": requirements("requirements-test.txt"),
        "xformers": ["xformers"],
        "lycoris": ["lycoris-lora==4.1.3"],
        "optimizers": ["bitsandbytes==0.50.2", "lion-pytorch==0.2.5", "prodigyopt==1.1.2", "schedulefree==1.4.1",
                       "dadaptation==3.2"],
    },
)
