"""The live search page (`demo.py serve`), driven in a real headless Chromium, and the server's
one-line errors. The browser test is skipped where Chromium and its driver are not installed
(`make test` installs Debian's chromium and chromium-driver where it can). With
SEARCH_PAGE_SCREENSHOT=docs/search_page.png it writes the README's screenshot there."""
import http.client
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
UNREADABLE = "กขคง"  # Thai: outside the toy tokenizer's vocabulary, read as [UNK] only


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


INJECTED = '<img src=x onerror="window.injected = 1">'  # markup in a caption must show as text


def serve_command(checkpoint, videos, port):
    return [sys.executable, "demo.py", "serve", "-r", str(checkpoint), "--videos", str(videos), "--port", str(port),
            "-d", "cpu"]


def get(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read()


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """`demo.py serve` in its own process on a free port, up once its page answers, serving the
    Multi-Toy test set with markup appended to the English caption of one video: one its German
    caption finds, outside the screenshot's results (those of video 3's German caption)."""
    search, corpus = trained["retriever"].search, trained["corpus"]
    shown = {vid for vid, _ in search(corpus.captions["de"][3][0], trained["index"])}
    marked = next(i for i, vid in enumerate(corpus.ids) if vid not in shown
                  and vid in {v for v, _ in search(corpus.captions["de"][i][0], trained["index"])})
    items = pickle.loads(Path(trained["test_file"]).read_bytes())
    items[marked]["eval_caption_en"] += " " + INJECTED
    videos = tmp_path_factory.mktemp("served") / "multi_toy_test.pkl"
    videos.write_bytes(pickle.dumps(items))
    port = free_port()
    process = subprocess.Popen(serve_command(trained["checkpoint"], videos, port), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}: {process.stderr.read()[-2000:]}")
            try:
                if get(url + "/")[0] == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the server did not answer within 180 s")
                time.sleep(0.5)
        yield {"url": url, "port": port, "videos": videos, "marked": marked}
    finally:
        process.kill()
        process.wait(timeout=30)


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium chromium-driver; "
                    "`make test` does it where it runs as root with apt)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in requirements.txt")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def submit(driver, query):
    from selenium.webdriver.common.by import By
    box = driver.find_element(By.ID, "query")
    box.clear()
    box.send_keys(query)
    driver.find_element(By.ID, "go").click()


def wait_for(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def test_a_query_in_the_browser_finds_the_video_and_plots_its_moments(trained, server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    corpus = trained["corpus"]
    video = corpus.ids[3]
    query = corpus.captions["de"][3][0]  # a German caption of that video
    browser.get(server["url"] + "/")
    assert browser.title == "Video search"

    submit(browser, query)
    wait_for(browser, lambda d: d.find_element(By.ID, "status").text.startswith("10 of 200 videos in "))
    ranked = [row.get_attribute("id") for row in browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")]
    assert len(ranked) == 10 and f"hit-{video}" in ranked
    # The same ranking as the Python API, with the video's captions in every language on its row.
    assert ranked == [f"hit-{vid}" for vid, _ in trained["retriever"].search(query, trained["index"], top=10)]
    row = browser.find_element(By.ID, f"hit-{video}")
    for lang in corpus.captions:
        assert corpus.captions[lang][3][0] in row.text, lang
    assert float(browser.find_element(By.ID, "status").text.split(" in ")[1].split(" ms")[0]) > 0

    row.find_element(By.CSS_SELECTOR, "button.open").click()
    plot = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#moments img"))[0]
    wait_for(browser, lambda d: d.execute_script("return arguments[0].naturalWidth", plot) > 100)
    assert f"video {video}: best segment frames" in browser.find_element(By.ID, "moments").text

    shot = Path(os.environ.get("SEARCH_PAGE_SCREENSHOT") or tmp_path / "search_page.png")
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # An empty query and one the tokenizer cannot read: a message on the page, no results.
    for text, message in (("   ", "empty query"), (UNREADABLE, "reads this query as unknown tokens only")):
        submit(browser, text)
        wait_for(browser, lambda d: message in d.find_element(By.ID, "message").text)
        assert not browser.find_element(By.ID, "results").is_displayed()


def test_markup_in_captions_and_queries_shows_as_text(trained, server, browser):
    from selenium.webdriver.common.by import By
    browser.get(server["url"] + "/")
    marked = server["marked"]
    submit(browser, trained["corpus"].captions["de"][marked][0])
    row = wait_for(browser, lambda d: d.find_elements(By.ID, f"hit-{trained['corpus'].ids[marked]}"))[0]
    assert INJECTED in row.text  # the caption's markup, as characters
    submit(browser, "<b>a cup</b> " + INJECTED)
    wait_for(browser, lambda d: d.find_element(By.ID, "status").text.startswith("10 of 200 videos in "))
    assert not browser.find_elements(By.CSS_SELECTOR, "#results img, #results b")
    assert browser.execute_script("return window.injected") is None


def test_a_request_for_another_host_name_is_refused(server):
    """DNS rebinding: a page of another site whose name now points at 127.0.0.1."""
    for host, status in (("evil.example", 400), (f"localhost:{server['port']}", 200)):
        connection = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
        connection.request("GET", "/api/search?q=a+cup", headers={"Host": host})
        assert connection.getresponse().status == status, host
        connection.close()


def test_the_api_answers_bad_queries_with_400_and_a_message(server):
    for query, message in (("", "empty query"), (UNREADABLE, "unknown tokens only")):
        with pytest.raises(urllib.error.HTTPError) as raised:
            get(f"{server['url']}/api/search?" + urllib.parse.urlencode({"q": query}))
        assert raised.value.code == 400 and message in json.loads(raised.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as raised:
        get(f"{server['url']}/api/moments?" + urllib.parse.urlencode({"q": "a cup", "id": "nope"}))
    assert json.loads(raised.value.read()) == {"error": "unknown video id 'nope'"}


def test_a_second_server_on_the_same_port_exits_2_with_one_line(server, tmp_path):
    # The port is bound before the checkpoint is read: a missing one shows it is never loaded.
    result = subprocess.run(serve_command(tmp_path / "no.pt", server["videos"], server["port"]), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: port {server['port']} on 127.0.0.1 is in use (a server may already run there): "
        "stop it or choose another with --port"]


def test_unreadable_means_unknown_tokens_only(trained):
    retriever = trained["retriever"]
    assert retriever.unreadable(UNREADABLE) and retriever.unreadable("🙂 🙂")
    assert not retriever.unreadable("someone washes a cup")
    assert not retriever.unreadable("人が台所で玉ねぎを切る")  # mostly unknown, but two characters are read


def test_a_restarted_server_binds_a_port_with_connections_in_time_wait():
    from utils.search_server import bind_local
    listener = bind_local(0)
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end of the connection waits in TIME_WAIT
    client.close()
    listener.close()
    bind_local(port).close()


def test_bad_ports_and_an_index_of_another_size_are_one_line_errors(trained, capsys):
    import demo
    import torch
    from utils.inference import InferenceError, VideoIndex
    from utils.search_server import SearchService
    assert demo.main(["serve", "-r", "no.pt", "--videos", "no.pkl", "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --port 70000: expected 1 to 65535 (0: any free port)"]
    index = VideoIndex(["a", "b"], torch.nn.functional.normalize(torch.randn(2, 7), dim=1))
    with pytest.raises(InferenceError, match="the index holds 7-d embeddings but this model makes"):
        SearchService(trained["retriever"], index)
