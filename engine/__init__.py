"""cpt_studio.engine: everything that trains (no Qt).

Importing it turns transformers' hub kernels off for this process and the workers it starts:
transformers >= 5.25 otherwise kernelizes every model it loads with code from the Hugging Face
hub (`use_kernels` defaults to on when the `kernels` package is installed, and `model.train()`
kernelizes again). We choose which kernels run: ours (cpt_studio.kernels, applied by
engine/patching.py) or transformers' own PyTorch forwards, never code fetched at run time.
engine/model_loading.py checks each loaded model for it.
"""
import os

os.environ["USE_HUB_KERNELS"] = "0"
