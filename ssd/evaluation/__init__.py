"""Detection evaluation.

- :mod:`ssd.evaluation.coco`: the COCO metric through pycocotools (files or accumulated tensors).
- :mod:`ssd.evaluation.voc`: the PASCAL VOC metric (VOC2007 11-point AP, VOC2010+ AP).
- :mod:`ssd.evaluation.accumulator`: per-image records shared by both evaluators, merged across
  ranks (``add`` / ``state`` / ``from_states``).
- :mod:`ssd.evaluation.inference`: the evaluation transform and batched predictions.
- :mod:`ssd.evaluation.service`: a model evaluated on a shard set (``evaluate_on_shards``), the
  one evaluation loop of training, scoring and the pipelines.

The metric names are re-exported here; the service is imported from its module (it reads
shards, which the metrics do not need).
"""

from ssd.evaluation.coco import COCO_STAT_NAMES, CocoEvaluator, coco_evaluate
from ssd.evaluation.voc import VocEvaluator, voc_ap, voc_evaluate

__all__ = [
    "COCO_STAT_NAMES",
    "CocoEvaluator",
    "VocEvaluator",
    "coco_evaluate",
    "voc_ap",
    "voc_evaluate",
]
