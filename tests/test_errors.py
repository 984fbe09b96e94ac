"""The last line of a failed job (segray/errors.py): the cause a user can act on, whole."""

from __future__ import annotations

import pytest
from ray.exceptions import RayTaskError, UserCodeException

from segray.errors import MAX_LINE, one_line
from segray.infer import InferError
from segray.modelio import ModelError
from segray.storage import StorageError


def raised(make):
    try:
        make()
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("nothing raised")


def test_segrays_own_message_wins_over_the_wrapped_root_cause():
    def make():
        try:
            raise OSError("When creating bucket 'b': enable the allow_bucket_creation option")
        except OSError as e:
            raise StorageError("s3://b/out: not writable (no bucket 'b'); create the bucket") from e

    assert one_line(raised(make)) == "StorageError: s3://b/out: not writable (no bucket 'b'); create the bucket"


def test_a_ray_task_error_shows_the_exception_inside_it():
    cause = ModelError("/runs/x/model/model.pt: not a readable torch file (truncated)")
    err = RayTaskError("Predictor.__init__", "Traceback ...\nsegray.modelio.ModelError: ...", cause)
    assert one_line(err.as_instanceof_cause()) == f"ModelError: {cause}"


def test_ray_datas_udf_wrapper_is_looked_through_via_the_traceback_text():
    """Across processes the UserCodeException loses its __cause__; Ray keeps the traceback text."""
    text = (
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
        "segray.infer.InferError: s3://b/in/a.png: the frame could not be used; rename it\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
    )
    err = RayTaskError("MapBatches(load_frames)", text, UserCodeException("UDF failed to process a data block."))
    assert one_line(err) == "InferError: s3://b/in/a.png: the frame could not be used; rename it"


def test_never_a_bare_class_and_never_cut_mid_word():
    class SystemException(Exception):
        pass

    line = one_line(SystemException())
    assert line.startswith("SystemException") and line != "SystemException"
    long = one_line(InferError("word " * 500))
    assert len(long) <= MAX_LINE + 2 and long.endswith("word …")
    multi = one_line(ValueError("first line\nsecond line naming the file"))
    assert multi == "ValueError: first line second line naming the file"


@pytest.mark.parametrize("exc", [KeyError("k"), UnicodeEncodeError("utf-8", "a\udcff", 1, 2, "surrogates not allowed")])
def test_builtin_errors_keep_their_whole_message(exc):
    line = one_line(exc)
    assert line.startswith(type(exc).__name__ + ": ") and str(exc).split()[-1] in line


def test_a_wrapper_line_in_the_traceback_text_is_never_the_answer():
    text = (
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
        "ValueError: /data/in/x.png: the real cause\n"
    )
    err = RayTaskError("MapBatches(postprocess)", text, UserCodeException("UDF failed to process a data block."))
    assert one_line(err) == "ValueError: /data/in/x.png: the real cause"
