"""ssd.distributed.console: Ray's known noise is dropped from the console by narrow rules, and a
real error still reaches the user (the end-to-end check is in test_train_pipeline.py)."""

from __future__ import annotations

import logging

from ssd.distributed.console import _filtered, keep_line, quiet_train_console

PREEMPTION = ("[2026-12-03 09:21:35,963 E 14868 14897] core_worker.cc:2465: Actor with class name: "
              "'PreemptionWatcher' and ID: '43' has constructor arguments in the object store and max_restarts > 0")


def test_known_ray_noise_is_dropped_only_from_its_component():
    assert not keep_line("TrainController", PREEMPTION)
    assert keep_line("RayTrainWorker", PREEMPTION)  # the same words from elsewhere are not known noise
    assert not keep_line("PlacementGroupCleaner", "Failed to query Ray Train Controller actor state. State API ...")
    assert keep_line("TrainController", "core_worker.cc:1: Actor with class name: 'MyActor' failed")
    assert keep_line("RayTrainWorker", "ValueError: shard-000003.tar: truncated tar header")


def test_a_batch_keeps_its_real_lines_and_metadata():
    printed = []
    _filtered(printed.append, {"actor_name": "TrainController", "pid": 7, "is_err": True,
                               "lines": [PREEMPTION, "RuntimeError: the real problem"]})
    _filtered(printed.append, {"actor_name": "TrainController", "pid": 7, "is_err": True, "lines": [PREEMPTION]})
    assert printed == [{"actor_name": "TrainController", "pid": 7, "is_err": True,
                        "lines": ["RuntimeError: the real problem"]}]


def test_train_console_drops_only_the_replaced_tracebacks(capsys):
    logger = logging.getLogger("ray.train")
    console, file_log = logging.StreamHandler(), logging.FileHandler("/dev/null")
    logger.addHandler(console)
    logger.addHandler(file_log)
    try:
        quiet_train_console()
        quiet_train_console()  # twice: still one filter
        assert len(console.filters) == 1 and file_log.filters == []
        logging.getLogger("ray.train.v2._internal.util").error("Error in training function:\nTraceback ...")
        logging.getLogger("ray.train.v2.x").error("Worker group startup timed out")
        err = capsys.readouterr().err
        assert "Error in training function" not in err and "Worker group startup timed out" in err
    finally:
        logger.removeHandler(console)
        logger.removeHandler(file_log)
        file_log.close()
