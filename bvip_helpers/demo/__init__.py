"""The CPU demo's machinery: what stands in for real data and a real checkpoint on a laptop without the hub.

- :mod:`bvip_helpers.demo.synth`       synthetic street scenes with label masks (``bvip synth``)
- :mod:`bvip_helpers.demo.twins`       tiny offline twins of each model family (``bvip tiny-model``)
- :mod:`bvip_helpers.demo.pretrain`    the two stages that turn a random twin into a base model
- :mod:`bvip_helpers.demo.copy_paste`  pasted copies of the training scenes, with rebuilt captions
- :mod:`bvip_helpers.demo.base`        the committed base model ``models/tiny-qwen2-vl-base`` (``bvip demo base``)
- :mod:`bvip_helpers.demo.settings`    the demo's settings, and the notebook parameters ``make demo`` passes

The pipeline (``bvip_helpers`` itself) never imports this package: a learner's path from the CSVs to a
fine-tuned real model runs without it, and ``tests/test_layout.py`` checks that.
"""
