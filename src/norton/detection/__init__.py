"""Detection: Faster / Mask / Keypoint R-CNN (torchvision's classes) on a norton ResNet backbone.

Modules (each imported on use; ``import norton.detection`` imports nothing heavy):

* ``models``: :func:`~norton.detection.models.create_detector`, ``is_detector``,
  ``detector_example_inputs``: detectors whose body is any norton ResNet-50 (dense,
  decomposed, pruned), with FPN input widths read from the body, saved and loaded by
  ``norton.save`` / ``norton.load``;
* ``parts``: which parts of a detector ``decompose`` and ``prune`` act on
  (``detector_parts=("body", "fpn", "rpn", "box_head", ...)``; the body by default);
* ``export``: ONNX export of a detector checked against eager outputs;
* ``coco``, ``transforms``, ``evaluate``, ``demo_data``, ``train``, ``demo``, ``visualize``,
  ``complexity``: data, training, COCO AP/AR, pictures and MACs of detectors.
"""
