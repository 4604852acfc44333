from setuptools import find_packages, setup

# The framework is not in install_requires: `paddlepaddle` (CPU) and `paddlepaddle-gpu` both provide the
# `paddle` module, and requiring one drags it in beside the other. Pick it with an extra or a requirements file.
setup(
    name="paddle-megatronbert",
    version="0.1.0",
    description="NVIDIA's MegatronBERT (pre-LayerNorm BERT, 345M) in PaddlePaddle, with tensor and data parallelism",
    packages=find_packages(include=["paddle_megatronbert", "paddle_megatronbert.*"]),
    package_data={"paddle_megatronbert": ["vocab/*.txt", "kernels/*.cc", "kernels/*.h"]},
    python_requires=">=3.9",
    install_requires=[
        "paddlenlp==2.8.1",
        "h5py",
        "tqdm",
        "numpy==1.26.4",
        "huggingface_hub<2",
        "aistudio-sdk<0.3",
        "pyarrow<26",
    ],
    extras_require={
        "cpu": ["paddlepaddle==3.3.1"],
        "test": ["pytest", "torch==2.13.0", "transformers", "safetensors"],
        "plot": ["matplotlib"],
    },
)
