"""The web console in a real browser (headless Chromium over WebDriver),
against a real `leasehold dev`. Each scenario saves screenshots."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import httpx
import pytest
from selenium.common.exceptions import (NoAlertPresentException, StaleElementReferenceException, TimeoutException,
                                        WebDriverException)
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

import leasehold
from leasehold import Client

from conftest import Broker

TOOLS = ["demo.read", "demo.write", "demo.admin"]
T = TypeVar("T")


def find(driver: WebDriver, css: str, timeout: float = 10) -> Any:
    """The element `css` names, waited for: a click that submits a form
    returns before the page it leads to has arrived (a CI run failed reading
    the sign-in page's error straight after the click)."""
    return WebDriverWait(driver, timeout).until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))


def goto(driver: WebDriver, url: str, css: str) -> Any:
    """Open a page and wait for the element `css` names in it, asking for
    the page again if chromedriver hands back an empty document (see load)."""
    for _ in range(3):
        driver.get(url)
        try:
            return find(driver, css, 5)
        except TimeoutException:
            pass
    return find(driver, css, 5)


def sign_in(driver: WebDriver, broker: Broker, who: str) -> None:
    goto(driver, broker.url + "/console/login", "#token").send_keys(broker.tokens[who])
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    WebDriverWait(driver, 10).until(lambda d: "/console/login" not in d.current_url)


def load(driver: WebDriver, url: str, expect: str) -> None:
    """Open a page and wait for `expect` in it. Chromedriver on a loaded
    host has answered a navigation with an empty document (a CI run failed
    on it); the page is asked for again then, three times at most."""
    for _ in range(3):
        driver.get(url)
        try:
            WebDriverWait(driver, 5).until(lambda d: expect in d.page_source)
            return
        except TimeoutException:
            pass
    assert expect in driver.page_source, url


def gone(element: Any) -> Callable[[WebDriver], bool]:
    """Whether `element` has left the document. Mid-navigation chromedriver
    may say so as an inspector error ("Node with given id does not belong
    to the document") instead of a stale reference: that is gone too."""

    def check(_: WebDriver) -> bool:
        try:
            element.is_enabled()
            return False
        except StaleElementReferenceException:
            return True
        except WebDriverException as e:
            if "does not belong to the document" in str(e) or "No node with given id" in str(e):
                return True
            raise

    return check


def submit(driver: WebDriver, button: Any) -> None:
    """Click a form's button and wait until the page it leads to replaced
    this one (acting before that races the navigation)."""
    button.click()
    WebDriverWait(driver, 15).until(gone(button))


def shot(driver: WebDriver, shots: Path, name: str) -> None:
    driver.save_screenshot(str(shots / f"{name}.png"))


def session_client(driver: WebDriver, broker: Broker) -> httpx.Client:
    """An HTTP client holding the browser's cookies (to forge requests)."""
    jar = {c["name"]: c["value"] for c in driver.get_cookies()}
    return httpx.Client(base_url=broker.url, cookies=jar, follow_redirects=False, timeout=30)


def on_card(driver: WebDriver, approval_id: str, act: Callable[[Any], T]) -> T:
    """Do something to an approval's card. The list is swapped in anew
    whenever the pending set changes (approvals of other tests' tasks
    expire meanwhile), which can make a card found a moment ago stale; once
    its comment has text, the console holds further swaps back."""
    for attempt in range(5):
        try:
            return act(WebDriverWait(driver, 10).until(
                EC.presence_of_element_located((By.ID, f"approval-{approval_id}"))))
        except StaleElementReferenceException:
            if attempt == 4:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def no_alert(driver: WebDriver) -> None:
    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return
    pytest.fail("a script ran: an alert is open")


def test_an_approver_sees_a_request_arrive_and_approves_it(broker: Broker, browser: Any, shots: Path) -> None:
    driver: WebDriver = browser
    sign_in(driver, broker, "approver")
    assert driver.current_url.endswith("/console/approvals")
    shot(driver, shots, "1-approvals-empty")
    with Client(broker.url, token=broker.tokens["assistant-a"]) as c, c.task(
            purpose="update ticket 42", on_behalf_of="alice@example.com", prompt="Please fix ticket 42's title",
            tools=TOOLS, ttl_seconds=600) as task:
        with pytest.raises(leasehold.ApprovalRequired) as e:
            task.call("demo.write", "update", "ticket:42", arguments={"title": "fixed"},
                      credential={"provider": "token", "role": "demo", "ttl_seconds": 60})
        approval_id = e.value.approval_id
        # it appears without a reload
        WebDriverWait(driver, 15).until(EC.presence_of_element_located((By.ID, f"approval-{approval_id}")))
        text = on_card(driver, approval_id, lambda card: card.text)
        prompt_sha = hashlib.sha256(b"Please fix ticket 42's title").hexdigest()
        for shown in ("demo.write", "update", "ticket:42", "dev:assistant-a", "alice@example.com",
                      "update ticket 42", prompt_sha, "write-demo-with-approval",
                      leasehold.arguments_sha256({"title": "fixed"}), "token/demo", "time left"):
            assert shown in text, f"{shown!r} not on the card: {text}"
        shot(driver, shots, "2-approval-arrived")
        # a denial needs a comment: the API's message next to the form, nothing changed
        on_card(driver, approval_id, lambda card: card.find_element(By.CSS_SELECTOR, "button.deny").click())
        err = WebDriverWait(driver, 10).until(EC.presence_of_element_located((By.CSS_SELECTOR, f"#approval-{approval_id} .error")))
        assert "comment" in err.text.lower()
        shot(driver, shots, "3-deny-without-comment")
        assert c.get_approval(approval_id).state == "pending"
        # approve with a comment
        on_card(driver, approval_id, lambda card: card.find_element(By.TAG_NAME, "textarea").send_keys("ticket 42 only"))
        on_card(driver, approval_id, lambda card: card.find_element(By.CSS_SELECTOR, "button.approve").click())
        WebDriverWait(driver, 10).until(EC.invisibility_of_element_located((By.ID, f"approval-{approval_id}")))
        shot(driver, shots, "4-approved")
        assert task.wait_for_approval(approval_id, timeout=5).state == "approved"
        r = task.call("demo.write", "update", "ticket:42", arguments={"title": "fixed"},
                      credential={"provider": "token", "role": "demo", "ttl_seconds": 60}, approval_id=approval_id)
        assert r.decision == "allow" and r.lease is not None
        # the chain says who approved, with the comment
        events = broker.as_operator("admin", "GET", f"/v1/events?task={task.id}")["events"]
        approved = [ev for ev in events if ev["kind"] == "approval.approved"]
        assert approved and approved[0]["data"].get("decided_by") == "operator:approver", approved
        assert approved[0]["data"].get("comment") == "ticket 42 only"
        # a break-glass call: the approver signs the task off afterwards
        r = task.call("demo.admin", "restart", "db:prod", break_glass="prod is down, INC-7")
        assert r.break_glass
    review = goto(driver, broker.url + "/console/reviews", "article.review")
    assert "prod is down, INC-7" in review.text and "demo.admin" in review.text
    shot(driver, shots, "5-break-glass-review")
    review.find_element(By.TAG_NAME, "button").click()
    assert "comment" in WebDriverWait(driver, 10).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, "article.review .error"))).text.lower()
    review = driver.find_element(By.CSS_SELECTOR, "article.review")
    review.find_element(By.TAG_NAME, "textarea").send_keys("justified: INC-7")
    submit(driver, review.find_element(By.TAG_NAME, "button"))
    WebDriverWait(driver, 10).until(lambda d: not d.find_elements(By.CSS_SELECTOR, "article.review"))
    shot(driver, shots, "6-signed-off")
    # a request made for the approver themself is shown, never decidable by them
    driver.get(broker.url + "/console/approvals")
    with Client(broker.url, token=broker.tokens["assistant-a"]) as c:
        own = c.open_task(purpose="for the approver", on_behalf_of="approver@example.com", prompt="p",
                          tools=TOOLS, ttl_seconds=600)
        with pytest.raises(leasehold.ApprovalRequired) as mine:
            own.call("demo.write", "update", "ticket:1")
        WebDriverWait(driver, 15).until(
            EC.presence_of_element_located((By.ID, f"approval-{mine.value.approval_id}")))
        text, buttons = on_card(driver, mine.value.approval_id,
                                lambda card: (card.text, card.find_elements(By.CSS_SELECTOR, "button")))
        assert "another approver must decide" in text
        assert not buttons
        shot(driver, shots, "7-own-request")
        own.complete()


def test_a_responder_revokes_a_workloads_leases_and_fences_it(broker: Broker, browser: Any, shots: Path) -> None:
    driver: WebDriver = browser
    tokens = []
    with Client(broker.url, token=broker.tokens["assistant-b"]) as c:
        tasks = [c.open_task(purpose=f"batch {i}", on_behalf_of="bob@example.com", prompt="p", ttl_seconds=900)
                 for i in range(20)]
        for t in tasks:
            for _ in range(15):
                tokens.append(t.lease("token", "demo", 600).credential.token)
    assert len(tokens) == 300
    sign_in(driver, broker, "responder")
    assert driver.current_url.endswith("/console/incident")
    form = find(driver, "form.selector")
    form.find_element(By.NAME, "workload").send_keys("dev:assistant-b")
    form.find_element(By.NAME, "reason").send_keys("INC-42: assistant-b's token in a log")
    form.find_element(By.NAME, "fence").click()
    shot(driver, shots, "1-selector")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, 10).until(EC.title_contains("Confirm"))
    assert "300 leases would be revoked" in driver.page_source
    shot(driver, shots, "2-dry-run")
    # a confirmation with the wrong reason changes nothing
    driver.find_element(By.NAME, "confirm").send_keys("oops")
    driver.find_element(By.CSS_SELECTOR, "button.deny").click()
    assert "Type the reason exactly" in WebDriverWait(driver, 10).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, ".error"))).text
    assert broker.introspect(tokens[0])["active"] is True
    driver.find_element(By.NAME, "confirm").send_keys("INC-42: assistant-b's token in a log")
    driver.find_element(By.CSS_SELECTOR, "button.deny").click()
    WebDriverWait(driver, 10).until(EC.title_contains("Job"))
    try:
        WebDriverWait(driver, 60).until(lambda d: "State: done" in d.find_element(By.ID, "progress").text)
    finally:
        shot(driver, shots, "3-job")
    shot(driver, shots, "3-job-finished")
    assert "300 of 300 done" in driver.find_element(By.ID, "progress").text
    assert not any(broker.introspect(t)["active"] for t in tokens[::25])
    with Client(broker.url, token=broker.tokens["assistant-b"]) as c:
        with pytest.raises(leasehold.Fenced):
            c.open_task(purpose="p", on_behalf_of="bob@example.com", prompt="p", ttl_seconds=60)
    # the fence, and lifting it from the console
    fence = goto(driver, broker.url + "/console/incident", "form.fence")
    assert "dev:assistant-b" in fence.text
    fence.find_element(By.NAME, "reason").send_keys("keys rotated")
    submit(driver, fence.find_element(By.CSS_SELECTOR, "button"))
    WebDriverWait(driver, 10).until(
        lambda d: "Fences in force" in d.page_source and not d.find_elements(By.CSS_SELECTOR, "form.fence"))
    shot(driver, shots, "4-fence-lifted")
    # the blast radius shows what it did, none of it live now
    load(driver, broker.url + "/console/blast-radius?workload=dev:assistant-b", "still live")
    assert "0 still live" in driver.page_source
    shot(driver, shots, "5-blast-radius")
    # the leases page highlights nothing irrevocable, lists the revoked ones
    goto(driver, broker.url + "/console/leases?workload=dev:assistant-b&state=revoked", "table.leases")
    assert len(driver.find_elements(By.CSS_SELECTOR, "table.leases tbody tr")) >= 300
    shot(driver, shots, "6-leases")
    # the chain: its head and last checkpoint, verified on demand
    load(driver, broker.url + "/console/events", "last checkpoint")
    assert "head" in driver.page_source
    driver.find_element(By.CSS_SELECTOR, "main form[action='/console/events/verify'] button").click()
    ok = WebDriverWait(driver, 30).until(EC.presence_of_element_located((By.CSS_SELECTOR, "p.ok")))
    assert "intact" in ok.text
    shot(driver, shots, "7-chain-verified")


def test_roles_sessions_and_csrf_are_enforced(broker: Broker, browser: Any, shots: Path) -> None:
    driver: WebDriver = browser
    # signed out: sent to sign-in
    goto(driver, broker.url + "/console/approvals", "#token")
    assert driver.current_url.endswith("/console/login")
    # a workload's token is not an operator's
    driver.find_element(By.ID, "token").send_keys(broker.tokens["assistant-a"])
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    assert "workload's token" in find(driver, ".error").text
    shot(driver, shots, "1-workload-refused")
    # an approver cannot reach the incident page
    sign_in(driver, broker, "approver")
    load(driver, broker.url + "/console/incident", "needs the responder role")
    assert "Incident" not in driver.find_element(By.TAG_NAME, "nav").text
    shot(driver, shots, "2-approver-on-incident")
    # the console's pages carry the strict headers
    h = session_client(driver, broker).get("/console/approvals").headers
    assert "script-src 'self'" in h["content-security-policy"] and "frame-ancestors 'none'" in h["content-security-policy"]
    assert h["x-frame-options"] == "DENY"
    # a pending approval, and forged or missing CSRF tokens against it
    with Client(broker.url, token=broker.tokens["assistant-a"]) as c:
        task = c.open_task(purpose="p", on_behalf_of="alice@example.com", prompt="p", tools=TOOLS, ttl_seconds=600)
        with pytest.raises(leasehold.ApprovalRequired) as e:
            task.call("demo.write", "update", "ticket:7")
        aid = e.value.approval_id
        forged = session_client(driver, broker)
        for data in ({"csrf": "forged", "comment": "x"}, {"comment": "x"}):
            r = forged.post(f"/console/approvals/{aid}/approve", data=data)
            assert r.status_code == 403 and "CSRF" in r.text, r.text
        assert c.get_approval(aid).state == "pending", "nothing changed"
        # a responder cannot approve, even with its own valid form token
        responder = httpx.Client(base_url=broker.url, follow_redirects=False, timeout=30)
        login = responder.get("/console/login")
        token = login.text.split('name="csrf" value="')[1].split('"')[0]
        assert responder.post("/console/login", data={"csrf": token, "token": broker.tokens["responder"]}).status_code == 303
        page = responder.get("/console/reviews").text
        csrf = page.split('name="csrf" value="')[1].split('"')[0]
        r = responder.post(f"/console/approvals/{aid}/approve", data={"csrf": csrf})
        assert r.status_code == 403 and "approver role" in r.text
        assert c.get_approval(aid).state == "pending"
        task.complete()
    # sign out: the old session cookie is refused afterwards
    before = session_client(driver, broker)
    assert before.get("/console/approvals").status_code == 200
    goto(driver, broker.url + "/console/approvals", "form.signout button").click()
    WebDriverWait(driver, 10).until(lambda d: d.current_url.endswith("/console/login"))
    shot(driver, shots, "3-signed-out")
    r = before.get("/console/approvals")
    assert r.status_code in (303, 307) and r.headers["location"] == "/console/login"


def test_stored_markup_is_shown_as_text_everywhere(broker: Broker, browser: Any, shots: Path) -> None:
    driver: WebDriver = browser
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    with Client(broker.url, token=broker.tokens["assistant-a"]) as c:
        task = c.open_task(purpose="purpose " + evil, on_behalf_of="alice@example.com", prompt="prompt " + evil,
                           tools=TOOLS, ttl_seconds=600)
        with pytest.raises(leasehold.ApprovalRequired) as e:
            task.call("demo.write", "update", "resource " + evil)
        lease = task.lease("token", "demo", 60)
        sign_in(driver, broker, "approver")
        source = driver.page_source
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in source and "<script>alert(1)" not in source
        assert f"purpose {evil}" in on_card(driver, e.value.approval_id, lambda card: card.text)
        no_alert(driver)
        shot(driver, shots, "1-approval-with-markup")
        aid = e.value.approval_id
        on_card(driver, aid, lambda card: card.find_element(By.TAG_NAME, "textarea").send_keys("comment " + evil))
        on_card(driver, aid, lambda card: card.find_element(By.CSS_SELECTOR, "button.deny").click())
        WebDriverWait(driver, 10).until(EC.invisibility_of_element_located((By.ID, f"approval-{e.value.approval_id}")))
        # the responder's views: the task's story (comment, resource, purpose) and a job's reason
        submit(driver, driver.find_element(By.CSS_SELECTOR, "form.signout button"))
        sign_in(driver, broker, "responder")
        text = goto(driver, broker.url + f"/console/tasks/{task.id}", "main").text
        assert f"comment {evil}" in text and f"resource {evil}" in text
        assert "<script>alert(1)" not in driver.page_source
        no_alert(driver)
        shot(driver, shots, "2-story-with-markup")
        form = goto(driver, broker.url + "/console/incident", "form.selector")
        form.find_element(By.NAME, "workload").send_keys("dev:assistant-a")
        form.find_element(By.NAME, "reason").send_keys("reason " + evil)
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(driver, 10).until(EC.title_contains("Confirm"))
        assert f"reason {evil}" in driver.find_element(By.TAG_NAME, "main").text
        no_alert(driver)
        shot(driver, shots, "3-reason-with-markup")
        # a form the API refuses shows its message and changes nothing
        goto(driver, broker.url + "/console/incident", "form.selector button[type=submit]").click()
        err = WebDriverWait(driver, 10).until(EC.presence_of_element_located((By.CSS_SELECTOR, "form.selector .error")))
        assert err.text
        shot(driver, shots, "4-empty-selector-refused")
        # one lease revoked from its page, its story told there
        assert "active" in goto(driver, broker.url + f"/console/leases/{lease.lease_id}", "dd.state").text
        driver.find_element(By.CSS_SELECTOR, f"form[action='/console/leases/{lease.lease_id}/revoke'] button").click()
        WebDriverWait(driver, 10).until(lambda d: "revoked" in d.find_element(By.CSS_SELECTOR, "dd.state").text)
        assert "lease.revoked" in driver.find_element(By.CSS_SELECTOR, "table.events").text
        assert broker.introspect(lease.credential.token)["active"] is False
        shot(driver, shots, "5-lease-revoked")
        task.complete()


def test_read_only_pages_work_without_javascript(broker: Broker, browser_without_javascript: Any, shots: Path) -> None:
    driver: WebDriver = browser_without_javascript
    with Client(broker.url, token=broker.tokens["assistant-a"]) as c:
        task = c.open_task(purpose="no-js check", on_behalf_of="alice@example.com", prompt="p", tools=TOOLS,
                           ttl_seconds=600)
        lease = task.lease("token", "demo", 60)
        with pytest.raises(leasehold.ApprovalRequired) as e:
            task.call("demo.write", "update", "ticket:3")
        sign_in(driver, broker, "approver")
        # the page's own scripts did not run (WebDriver's may)
        assert driver.execute_script("return typeof window.htmx") == "undefined"
        assert f"approval-{e.value.approval_id}" in driver.page_source
        shot(driver, shots, "1-approvals-no-js")
        submit(driver, driver.find_element(By.CSS_SELECTOR, "form.signout button"))
        sign_in(driver, broker, "responder")
        for path, expect in [("/console/leases", lease.lease_id), (f"/console/leases/{lease.lease_id}", "lease.issued"),
                             ("/console/incident", "Mass revocation"), ("/console/events", "Verify now"),
                             (f"/console/tasks/{task.id}", "task.opened"), ("/console/reviews", "Break-glass"),
                             ("/console/blast-radius?workload=dev:assistant-a", "no-js check")]:
            load(driver, broker.url + path, expect)
        shot(driver, shots, "2-task-story-no-js")
        task.complete()
