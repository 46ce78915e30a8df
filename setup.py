"""Installation of speechbrain-blspkd (``pip install -e .``)."""

import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent
version = {}
exec((here / "speechbrain_blspkd" / "version.py").read_text(), version)

setup(
    name="speechbrain_blspkd",
    version=version["__version__"],
    description=(
        "SpeechBrain toolkit and recipes that teach a text LLM to follow "
        "spoken instructions by distilling its own text behaviour (BLSP-KD)"
    ),
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(
        include=["speechbrain_blspkd", "speechbrain_blspkd.*"]
    ),
    # files read at run time beside the modules: the model card's template
    package_data={"speechbrain_blspkd.inference": ["model_card.md"]},
    install_requires=[
        "torch>=2.3",
        "torchaudio>=2.3",
        "speechbrain>=1.1.2",
        "transformers>=5.0",
        "peft>=0.13",
        "hyperpyyaml>=1.2",
        "sentencepiece",
        "sacrebleu>=2.4",
        "soundfile>=0.12",
        "tensorboard>=2.21",
        "gguf",
        "tqdm",
        "safetensors",
        "numpy",
    ],
    extras_require={
        # the browser demo (blspkd-demo-ui); the core install stays lean
        "demo": ["gradio>=6.0"],
        # the OpenAI-compatible server (blspkd-serve)
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
    },
    entry_points={
        "console_scripts": [
            "blspkd-assets=speechbrain_blspkd.assets.__main__:main",
            "blspkd-infer=speechbrain_blspkd.inference.cli:main",
            "blspkd-demo-ui=speechbrain_blspkd.inference.demo_ui:main",
            "blspkd-serve=speechbrain_blspkd.serve.cli:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
