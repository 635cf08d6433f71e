"""cpt_studio.engine: everything that trains (no Qt).

Importing it shuts transformers' and bitsandbytes' doors to kernels from the Hugging Face hub, for
this process and the workers it starts (engine/hub_kernels.py): the kernels that run are ours
(cpt_studio.kernels, applied by engine/speed/patching.py) or the libraries' own code, never code fetched
at run time.
"""
from .hub_kernels import refuse_hub_kernels

refuse_hub_kernels()
