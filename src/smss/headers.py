"""HTTP header names of SMSS's own, shared by the server and the clients that read them."""

from __future__ import annotations

#: On every model answer: ``1`` when the request waited for its instance to start
#: (a cold start, as the dispatcher and the simulator count them), else ``0``.
COLD_START = "SMSS-Cold-Start"
#: On the answer of a workflow called through the v2 infer route: its run's id.
RUN_ID = "SMSS-Run-Id"
