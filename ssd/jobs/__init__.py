"""The job layer, without Ray: what a training run, a sweep or the pretrain-finetune pipeline is
asked to do (frozen request dataclasses whose fields are the scripts' options) and its
resolution into what the run layer needs (config, shards, run identity), with every check that
can refuse a request in seconds, before Ray starts.

``ssd.jobs.common``: errors, storage and data resolution shared by every job;
``ssd.jobs.train``, ``ssd.jobs.sweep``, ``ssd.jobs.pretrain_finetune``: each job's request and
resolution. ``ssd.distributed.train_job``, ``sweep_job`` and ``pretrain_finetune_job`` run them
on Ray.
"""

from ssd.jobs.common import BadRequest, JobError, JobInterrupted

__all__ = ["BadRequest", "JobError", "JobInterrupted"]
