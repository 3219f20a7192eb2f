"""Starting again: an engine process started again after a stop or a failed start (its pipes
closed, no descriptor left behind), and `gpt1 serve` closing its port when the engine does not
start."""

from __future__ import annotations

from pathlib import Path

import pytest


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
def test_an_engine_process_starts_again_after_a_stop_or_a_failed_start(tiny_model_dir):
    """A process-engine app served a second time (or after a failed start) answered every request
    503 ("the server is shutting down"), having started without a word; and each stopped engine
    kept its two pipe descriptors until garbage-collected."""
    import gpt1
    from gpt1.core.errors import Gpt1Error
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.inference.engine_process import EngineProcess
    from tests.test_engine_process import Outputs

    llm = gpt1.load(tiny_model_dir, device="cpu")
    engine = EngineProcess(llm.path, llm.tokenizer, llm.config, device="cpu", max_batch=2, max_queue=2)
    before = _open_fds()
    for _ in range(2):
        with engine:
            outputs = Outputs(1)
            engine.submit([llm.tokenizer.encode("def")], SamplingParams(temperature=0, max_new_tokens=2),
                          outputs.sink_for())
            outputs.wait()
            assert outputs.items[0][-1].finish_reason == "length"
        assert _open_fds() == before  # the pipes closed with the stop, not at garbage collection
    failing = EngineProcess(llm.path, llm.tokenizer, llm.config, device="cpu", max_batch=10**9, max_queue=0)
    for _ in range(2):  # the same reason each time, not a server that answers 503
        with pytest.raises(Gpt1Error):
            failing.start()
        assert _open_fds() == before


def test_serve_closes_its_port_when_the_engine_does_not_start(tiny_model_dir, monkeypatch, capsys):
    """The port is bound before the engine starts (a taken port is said at once): an engine whose
    start failed, or a signal during it, left the socket to the garbage collector (a
    ResourceWarning in dev mode, the port held until then)."""
    import gc
    import warnings

    from gpt1.cli import main
    from gpt1.core.errors import Gpt1Error
    from gpt1.inference.engine_process import EngineProcess

    def fails(self):
        raise Gpt1Error("the engine could not start")

    monkeypatch.setattr(EngineProcess, "start", fails)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        rc = main(["serve", "--model", str(tiny_model_dir), "--engine", "process", "--port", "0", "--device", "cpu"])
        gc.collect()
    assert rc == 2 and "the engine could not start" in capsys.readouterr().err
    assert not [w for w in caught if issubclass(w.category, ResourceWarning) and "socket" in str(w.message)]
