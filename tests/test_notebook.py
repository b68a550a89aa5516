"""The notebook is home: a real Jupyter kernel runs cells on a loopback fleet whose third
host comes up while the first call works.  The cell gets one display that updates in place
(recorded as ``update_display_data``) and ends as the call's summary, and the tasks'
output, each line prefixed by its host.  The notebook is then rendered to HTML and
photographed in headless Chromium; the picture stays in the test's temporary directory."""

from __future__ import annotations

import re
import threading
import time

import pytest
from helpers import wait_until

kernel = pytest.importorskip("kernel")  # needs nbclient, nbconvert, ipykernel (test extra)

SETUP = """\
import time
from joblib import Parallel, delayed, parallel_backend
import joblib_cloud

settings = {settings!r}

def work(i):
    time.sleep(0.5)
    print(f"task {{i}} done")
    return i * i
"""

FIRST_CALL = """\
with parallel_backend("cloud", **settings):
    squares = Parallel(n_jobs=-1, batch_size=1)(delayed(work)(i) for i in range(40))
assert squares == [i * i for i in range(40)]
"""

SECOND_CALL = """\
with parallel_backend("cloud", **settings):
    total = sum(Parallel(n_jobs=-1, batch_size=1)(delayed(work)(i) for i in range(12)))
total
"""

HANDLE = "joblib_cloud.status(**settings)"


def _html(output) -> str:
    return output.get("data", {}).get("text/html", "")


@pytest.mark.slow
def test_a_cell_shows_the_fleet_coming_up_the_work_and_the_cost(fresh_fleet, tmp_path,
                                                                 monkeypatch):
    late = fresh_fleet.hosts[2]
    late.kill()
    settings = fresh_fleet.kwargs(workers_per_host=2, connect_timeout=90, cluster="notebook")
    kernel.kernel_environment(monkeypatch, tmp_path)

    def bring_up_late_host() -> None:  # once the others work, as a slow VM would
        wait_until(lambda: any(h.accepted_logins() for h in fresh_fleet.hosts[:2]), 120,
                   "a first login")
        time.sleep(3)
        late.start(wait=False)

    starter = threading.Thread(target=bring_up_late_host, daemon=True)
    starter.start()
    nb, client = kernel.run([SETUP.format(settings=settings), FIRST_CALL, SECOND_CALL,
                             HANDLE],
                            tmp_path)
    starter.join()

    first = nb.cells[1]
    displays = [o for o in first.outputs if o.output_type == "display_data"]
    assert len(displays) == 1, first.outputs
    summary = displays[0]
    assert "joblib-cloud-summary" in _html(summary)
    text = summary["data"]["text/plain"]
    assert re.fullmatch(r"joblib-cloud: 40 tasks in [\d.]+s on [23] of 3 hosts", text), text

    updates = [content for index, content in client.updates if index == 1]
    ids = {u["transient"]["display_id"] for u in updates}
    assert len(ids) == 1 and len(updates) >= 3, updates
    live = [u["data"]["text/html"] for u in updates if "joblib-cloud-live" in
            u["data"]["text/html"]]
    late_name = f"{late.user}@{late.address}:{late.port}"
    late_rows = [re.search(re.escape(late_name) + r"</code></td><td[^>]*>([a-z ]+)", h)
                 for h in live]
    late_states = [m.group(1) for m in late_rows if m]
    assert "connecting" in late_states, late_states       # shown while it booted...
    assert late_states[-1] in ("starting agent", "ready"), late_states  # ...and joining
    progress = _done(live)  # the total shows once joblib has read the whole generator
    assert progress == sorted(progress) and progress[-1] > 0, progress
    assert any(re.search(r"<b>\d+</b> of 40 tasks done", h) for h in live)
    assert "joblib-cloud-summary" in updates[-1]["data"]["text/html"]

    printed = "".join(o.get("text", "") for o in first.outputs
                      if o.output_type == "stream" and o.name == "stdout")
    lines = [line for line in printed.splitlines() if line.endswith(" done")]
    assert sorted(int(line.split("task ")[1].split()[0]) for line in lines) == list(range(40))
    prefixes = {line.split("] ")[0] + "]" for line in lines}
    assert prefixes <= {f"[{h.user}@{h.address}:{h.port}]" for h in fresh_fleet.hosts}
    assert len(prefixes) >= 2, prefixes
    noise = "".join(o.get("text", "") for c in nb.cells for o in c.outputs
                    if o.output_type == "stream" and o.name == "stderr")
    assert "Traceback" not in noise and "Error reading SSH" not in noise, noise

    second = nb.cells[2]
    (again,) = [o for o in second.outputs if o.output_type == "display_data"]
    assert re.fullmatch(r"joblib-cloud: 12 tasks in [\d.]+s on \d of 3 hosts",
                        again["data"]["text/plain"])
    (result,) = [o for o in second.outputs if o.output_type == "execute_result"]
    assert result["data"]["text/plain"] == str(sum(i * i for i in range(12)))

    (view,) = nb.cells[3].outputs
    assert "joblib-cloud-status" in _html(view)
    assert _html(view).count(">connected<") == 3
    assert "6 workers on 3 hosts, 0 batches running, 0 queued" in _html(view)

    page = kernel.to_html(nb, tmp_path / "notebook.html")
    png = kernel.photograph(page, tmp_path / "notebook.png", tmp_path / "chromium",
                            size="1100,1900")
    assert png.stat().st_size > 20_000
    # and the cell as it looked mid-call: the late host still on its way, tasks running
    moments = [(h, bool(state and state.group(1) != "ready"), done)
               for h, state, done in zip(live, late_rows, _done(live), strict=True)]
    moment = ([h for h, joining, done in moments if joining and done]
              or [h for h, _, done in moments if done])[-1]
    summary["data"] = {"text/html": moment, "text/plain": "(live)"}
    del second.outputs[:], nb.cells[3].outputs[:]
    page = kernel.to_html(nb, tmp_path / "notebook-live.html")
    live_png = kernel.photograph(page, tmp_path / "notebook-live.png", tmp_path / "chromium",
                                 size="1100,700")
    print(f"notebook pictures: {png} {live_png}")


def _done(pages: list[str]) -> list[int]:
    return [int(m.group(1)) if (m := re.search(r"<b>(\d+)</b>( of \d+)? tasks done", h)) else 0
            for h in pages]
