"""The server test harness on its own, with no minisd server: free ports, a subprocess server
started, queried and stopped (and each way that can go wrong reported), and headless Chromium
loading pages, running their script, clicking, downloading and taking screenshots."""
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import server_harness  # tests/ is on sys.path: pytest's default "prepend" import mode
from server_harness import (
    chrome_driver,
    decode_body,
    free_port,
    require_chromium,
    running_process,
    running_server,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

PAGE = """<!doctype html><title>harness</title>
<p id="greeting">before</p>
<button id="go" onclick="document.getElementById('greeting').textContent='clicked'">go</button>
<a id="download" href="payload.bin" download>payload</a>
<script>document.getElementById('greeting').textContent = 'script ran';</script>
"""


def http_server(folder: Path, **kwargs) -> running_process:
    port = free_port()
    argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
            str(folder), str(port)]
    return running_process(argv, port, ready_path="/", timeout=30, **kwargs)


def python_server(code: str, **kwargs) -> running_process:
    """A server whose behaviour is the `code` run before serving the current folder on PORT."""
    port = free_port()
    script = ("import http.server, functools, os, signal, subprocess, sys\n" + code +
              f"\nhttp.server.ThreadingHTTPServer(('127.0.0.1', {port}),"
              " http.server.SimpleHTTPRequestHandler).serve_forever()\n")
    return running_process([sys.executable, "-c", script], port, ready_path="/", timeout=30,
                           **kwargs)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def site(tmp_path) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "index.html").write_text(PAGE)
    (folder / "data.json").write_text('{"a": [1, 2]}')
    (folder / "payload.bin").write_bytes(bytes(range(256)))
    return folder


def test_free_port_is_bindable():
    ports = {free_port() for _ in range(5)}
    for port in ports:
        assert 1024 <= port <= 65535
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            s.listen()


def test_running_process_serves_then_stops(site, tmp_path):
    with http_server(site, log_dir=tmp_path) as server:
        assert server.url == f"http://127.0.0.1:{server.port}"
        status, text = server.get("/index.html")
        assert status == 200 and "<title>harness</title>" in text
        assert server.get("/data.json") == (200, {"a": [1, 2]})
        status, body = server.get("/payload.bin")
        assert status == 200 and body == bytes(range(256))
        # 4xx and 5xx come back as answers, not exceptions.
        status, text = server.get("/missing")
        assert status == 404 and "404" in text
        status, text = server.post_json("/index.html", {"x": 1}, timeout=10)
        assert status == 501
        assert '"GET /missing HTTP/1.1" 404' in server.log_text()
        process = server.process
    assert process.returncode == -signal.SIGTERM  # http.server has no SIGTERM handler
    assert not listening(server.port)
    assert '"GET /missing HTTP/1.1" 404' in server.log_text()  # kept after the with-block
    assert (tmp_path / f"server-{server.port}.log").exists()  # log_dir keeps the log


def test_running_server_runs_minisd_serve():
    manager = running_server("--model", "some/folder", port=12345, timeout=5)
    assert manager.argv == [sys.executable, "-m", "minisd", "serve", "--host", "127.0.0.1",
                            "--port", "12345", "--model", "some/folder"]
    assert manager.ready_path == "/sdapi/v1/options" and manager.timeout == 5


def test_exit_before_ready_fails_with_the_log():
    port = free_port()
    code = "print('no model here'); raise SystemExit(3)"
    with (pytest.raises(AssertionError, match=r"(?s)exited with code 3 before.*no model here"),
          running_process([sys.executable, "-c", code], port, timeout=30)):
        pass


def test_exit_while_in_use_is_reported(site):
    with (pytest.raises(AssertionError, match="exited by itself with code -9 while in use"),
          http_server(site) as server):
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()


def test_never_ready_fails_and_is_killed():
    port = free_port()
    started = time.monotonic()
    code = "import time; print('waiting'); time.sleep(60)"
    with (pytest.raises(AssertionError, match=r"(?s)no 200 within 1 s.*waiting"),
          running_process([sys.executable, "-c", code], port, timeout=1)):
        pass
    assert time.monotonic() - started < 15


def test_not_ready_until_the_path_answers_200(site):
    # The folder has no /sdapi/v1/options: 404 until the timeout, reported as such.
    port = free_port()
    argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(site),
            str(port)]
    with (pytest.raises(AssertionError, match="last answer: HTTP 404"),
          running_process(argv, port, timeout=1)):
        pass


def test_unclean_exit_code_is_reported():
    with (pytest.raises(AssertionError, match=r"exit code 1 after SIGTERM, expected one of \(0, -15\)"),
          python_server("signal.signal(signal.SIGTERM, lambda *_: os._exit(1))")):
        pass


def test_ignoring_sigterm_is_reported_and_killed():
    with (pytest.raises(AssertionError, match="still running 1 s after SIGTERM"),
          python_server("signal.signal(signal.SIGTERM, signal.SIG_IGN)", stop_timeout=1) as server):
        process = server.process
    assert process.returncode == -signal.SIGKILL


def test_leftover_child_is_reported_and_killed():
    code = ("child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print('child', child.pid, flush=True)")
    with (pytest.raises(AssertionError, match="group still ran"),
          python_server(code) as server):
        child_pid = int(server.log_text().split()[1])
    time.sleep(0.2)
    assert not server_harness._group_alive(server.process.pid)
    assert not Path(f"/proc/{child_pid}").exists() or "Z" in Path(
        f"/proc/{child_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_exception_in_body_wins_and_server_still_stops(site):
    with pytest.raises(KeyError), http_server(site) as server:
        raise KeyError("from the test")
    assert server.process.returncode is not None and not listening(server.port)


def test_decode_body():
    assert decode_body({"content-type": "application/json"}, b'{"a": 1}') == {"a": 1}
    assert decode_body({"content-type": "text/plain"}, "é".encode()) == "é"
    assert decode_body({"content-type": "image/png"}, PNG_SIGNATURE) == PNG_SIGNATURE


def test_chromium_runs_a_page_clicks_downloads_and_screenshots(site, tmp_path):
    require_chromium()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with http_server(site) as server:
        driver = chrome_driver(download_dir=downloads)
        try:
            driver.get(server.url + "/index.html")
            assert driver.title == "harness"
            greeting = driver.find_element(By.ID, "greeting")
            assert greeting.text == "script ran"
            driver.find_element(By.ID, "go").click()
            assert greeting.text == "clicked"
            png = driver.get_screenshot_as_png()
            assert png.startswith(PNG_SIGNATURE)
            assert driver.get_window_size()["width"] == 1280

            driver.find_element(By.ID, "download").click()
            target = downloads / "payload.bin"
            WebDriverWait(driver, 10).until(lambda _: target.exists())
            assert target.read_bytes() == bytes(range(256))

            driver.get("data:text/html,<h1 id='h'>from a data URL</h1>")
            assert driver.find_element(By.ID, "h").text == "from a data URL"
        finally:
            driver.quit()
