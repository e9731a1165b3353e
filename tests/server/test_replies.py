"""A client's error reason in one line (the full reason stays in messages.jsonl)."""

from server.replies import error_summary

RAY = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
       "(pid=1, ip=192.0.2.2)\n  File \"client_app.py\", line 161, in __call__\n    return self._reg\n"
       "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: "
       "injected fault in round 2: the ClientApp raised'>")


def test_the_ray_traceback_becomes_the_raised_message():
    assert error_summary(RAY) == "injected fault in round 2: the ClientApp raised"


def test_one_line_reasons_are_kept_and_long_ones_cut():
    assert error_summary("InjectedFault: boom") == "InjectedFault: boom"
    assert error_summary("") == ""
    long = error_summary("x" * 1000, limit=50)
    assert len(long) == 50 and long.endswith("...")
