"""`minisd serve`'s own checks, before any server starts: what to install when the web extras
are missing, and bad ports and limits, each a one-line error with exit code 2. (The server
itself is tested over HTTP in test_server_api.py and in a browser in test_server_ui.py.)"""
import re
import socket
import sys

import pytest

from minisd.cli import main


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minisd: error: "), err
    return err[0]


def test_serve_without_the_web_extras_says_what_to_install(monkeypatch, capsys, tiny_current):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed: import raises ImportError
    assert main(["serve", "--model", str(tiny_current)]) == 2
    line = error_line(capsys)
    assert "gradio is missing" in line and 'pip install -c requirements-pins.txt -e ".[ui]"' in line


@pytest.mark.parametrize("args, words", [
    (["--port", "0"], r"--port: must lie in \[1, 65535\]"),
    (["--port", "70000"], r"--port: must lie in \[1, 65535\]"),
    (["--port", "x"], "--port: invalid int value"),
    (["--max-steps", "0"], "--max-steps: must be at least 1"),
    (["--max-images", "-2"], "--max-images: must be at least 1"),
    (["--max-size", "0x64"], "--max-size: must be positive"),
    (["--max-size", "big"], "--max-size"),
    (["--host", "no such host.invalid"], "--host: cannot serve on"),
    (["--device", "banana"], "--device: 'banana' is not a device name"),
])
def test_bad_serve_options(tiny_current, capsys, args, words):
    assert main(["serve", "--model", str(tiny_current), *args]) == 2
    assert re.search(words, error_line(capsys))


def test_a_port_in_use_is_refused_before_the_model_loads(capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A model folder that does not exist: the port is checked first, so this never matters.
        assert main(["serve", "--port", str(port), "--model", str(tmp_path / "no-model")]) == 2
    assert f"--port: cannot listen on 127.0.0.1:{port}" in error_line(capsys)
