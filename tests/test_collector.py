"""transferlab.collector: no collection while a stage imports; what it imported frozen out of later passes."""

import gc

from transferlab import collector


def test_importing_pauses_collection_then_freezes_what_exists() -> None:
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with collector.importing():
            assert not gc.isenabled()
            made = [[object()] for _ in range(1000)]  # tracked containers, as imports make
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(made)
    finally:
        gc.unfreeze()  # this is the test process: give the collector its objects back


def test_importing_leaves_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with collector.importing():
            pass
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
