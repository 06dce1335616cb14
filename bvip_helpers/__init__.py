"""bvip_helpers: the reusable code behind the bvip-captioning notebooks.

One module per stage:

- :mod:`bvip_helpers.schema`   caption fields, objects, compose and parse
- :mod:`bvip_helpers.io`       paths, atomic writes, JSONL, safe image loading
- :mod:`bvip_helpers.synth`    synthetic street scenes (the embedded default data)
- :mod:`bvip_helpers.dataset`  SENSATION CSVs -> SFT/DPO JSONL + merged CSV
- :mod:`bvip_helpers.evaluate` seed-compatible and structured metrics
- :mod:`bvip_helpers.registry` the model zoo
- :mod:`bvip_helpers.twins`    tiny offline twins of each model family
- :mod:`bvip_helpers.sft`      supervised fine-tuning
- :mod:`bvip_helpers.predict`  batched, resumable, optionally constrained generation
"""

__version__ = "0.1.0"
