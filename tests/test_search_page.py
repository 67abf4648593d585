"""The live search page (`demo.py serve`), driven in a real headless Chromium, and the server's
one-line errors. The browser test is skipped where Chromium and its driver are not installed
(`make test` installs Debian's chromium and chromium-driver where it can)."""
import json
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


def serve_command(trained, port):
    return [sys.executable, "demo.py", "serve", "-r", str(trained["checkpoint"]), "--videos",
            str(trained["test_file"]), "--port", str(port), "-d", "cpu"]


def get(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read()


@pytest.fixture(scope="module")
def server(trained):
    """`demo.py serve` in its own process on a free port, up once its page answers."""
    port = free_port()
    process = subprocess.Popen(serve_command(trained, port), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            if get(url + "/")[0] == 200:
                break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail("the server did not answer within 180 s")
            time.sleep(0.5)
    yield {"url": url, "port": port}
    process.terminate()
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

    shot = tmp_path / "search_page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # An empty query and one the tokenizer cannot read: a message on the page, no results.
    for text, message in (("   ", "empty query"), (UNREADABLE, "reads this query as unknown tokens only")):
        submit(browser, text)
        wait_for(browser, lambda d: message in d.find_element(By.ID, "message").text)
        assert not browser.find_element(By.ID, "results").is_displayed()


def test_the_api_answers_bad_queries_with_400_and_a_message(server):
    for query, message in (("", "empty query"), (UNREADABLE, "unknown tokens only")):
        with pytest.raises(urllib.error.HTTPError) as raised:
            get(f"{server['url']}/api/search?" + urllib.parse.urlencode({"q": query}))
        assert raised.value.code == 400 and message in json.loads(raised.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as raised:
        get(f"{server['url']}/api/moments?" + urllib.parse.urlencode({"q": "a cup", "id": "nope"}))
    assert json.loads(raised.value.read()) == {"error": "unknown video id 'nope'"}


def test_a_second_server_on_the_same_port_exits_2_with_one_line(trained, server):
    result = subprocess.run(serve_command(trained, server["port"]), cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: port {server['port']} on 127.0.0.1 is in use (a server may already run there): "
        "stop it or choose another with --port"]


def test_unreadable_means_unknown_tokens_only(trained):
    retriever = trained["retriever"]
    assert retriever.unreadable(UNREADABLE) and retriever.unreadable("🙂 🙂")
    assert not retriever.unreadable("someone washes a cup")
    assert not retriever.unreadable("人が台所で玉ねぎを切る")  # mostly unknown, but two characters are read
