import inspect

import shiftbn as sb


def test_public_names_exist_and_are_documented():
    assert len(sb.__all__) == len(set(sb.__all__))
    for name in sb.__all__:
        obj = getattr(sb, name)
        if callable(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"


def test_public_functions_have_type_hints():
    for name in sb.__all__:
        obj = getattr(sb, name)
        if inspect.isfunction(obj):
            sig = inspect.signature(obj)
            assert sig.return_annotation is not inspect.Signature.empty, f"{name} lacks a return annotation"
