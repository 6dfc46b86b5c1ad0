"""Every exit code an error of ours can end with has its HTTP status, in the one table."""

from vssflow.runtime import errors


def _all(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all(sub)


def test_every_exit_code_has_an_http_status():
    import vssflow.export.errors  # noqa: F401  (its errors share the root)
    codes = {errors.VssflowError.exit_code} | {c.exit_code for c in _all(errors.VssflowError)
                                                if getattr(c, "http_status", None) is None}
    assert codes <= set(errors.HTTP_STATUS), codes - set(errors.HTTP_STATUS)


def test_status_of_an_error():
    assert errors.http_status(errors.VideoError("x")) == 422
    assert errors.http_status(errors.ModelFolderError("x")) == 500
    assert errors.http_status(ValueError("a bug")) == 500
    e = errors.VssflowInputError("x")
    e.http_status = 401                     # a server's own error says its status
    assert errors.http_status(e) == 401
