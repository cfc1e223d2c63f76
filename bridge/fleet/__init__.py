"""State shared by the bridge processes that serve one phone number: single-use stream tokens,
call slots against a cap, the live stream of each CallSid, call control across processes
(``shared.py``; the pure ledger behind it in ``ledger.py``; the WORKERS parent's authority in
``parent.py``; a fleet's, in Redis, in ``redis_state.py``)."""
