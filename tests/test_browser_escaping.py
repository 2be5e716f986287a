"""Escaped markup in the real frontend (issue 24): a shared workflow whose KV Inject `mask_words` hold markup is queued
with the Queue button in Chromium; the pack's error (the word is not in the prompt) reaches the frontend, which shows
it, and the markup is shown as text: no element is made from it, its script does not run.

The 2024-03 frontend writes an execution error into its dialog with innerHTML (app.js ``#formatExecutionError`` ->
``ComfyDialog.show``), so an unescaped message would make the <img> and run its onerror. The v0.33.0 frontend
(comfyui-frontend-package) shows a toast "<node> failed" whose "View details" button opens the message, which it
renders as text itself. Control, on each: the same markup put unescaped into
the same dialog element with innerHTML does make the element and does run the script, so the checks can fail.

Same fixtures as tests/test_browser_workflows.py (one server, one Chromium page; IC_BROWSER=1, /usr/bin/chromium)."""
from __future__ import annotations

import json

import pytest

from tests.harness.measure import measured
from tests.harness.server import for_test_model, load_api_workflow, nodes_of
from tests.test_browser_workflows import (drop_workflow, live_state, page, set_widgets,  # noqa: F401  (fixtures)
                                          ui_server, wait_until_unblocked)

pytestmark = pytest.mark.server

MARKUP = '<img src=x onerror="window.__ic_xss=1">'
WORDS = f"zebra {MARKUP}"
NEEDLE = "is not in the prompt"   # the pack's error for mask words missing from the prompt
# Where the message is shown: the deepest visible element holding it, and around it the frontend's error container
# (2024-03: the .comfy-modal dialog; 0.3x: a PrimeVue dialog or toast, or the nearest block holding it).
SHOWN_JS = """needle => {
    const visible = el => el.offsetParent !== null || (el.getClientRects && el.getClientRects().length > 0);
    let best = null;
    for (const el of document.body.querySelectorAll("*")) {
        if (["SCRIPT", "STYLE", "TEXTAREA"].includes(el.tagName) || !visible(el)) continue;
        if ((el.textContent || "").includes(needle)) best = el;   // document order: a later match is deeper
    }
    if (!best) return null;
    return best.closest(".comfy-modal, .p-dialog, [role='dialog'], .p-toast-message, [role='alert'], aside")
        || best.parentElement;
}"""


def shown_report(pg) -> dict:
    """Where the frontend shows the error: that container's text and class, the <img> elements in it, the
    <img onerror> elements in the whole page, and whether the markup's script ran."""
    return pg.evaluate(f"""needle => {{
        const box = ({SHOWN_JS})(needle);
        return {{
            where: box ? box.tagName + "." + [...box.classList].join(".") : null,
            text: box ? box.textContent : null,
            imgs: box ? [...box.querySelectorAll("img")].map(i => i.outerHTML) : [],
            onerror_imgs: document.querySelectorAll("img[onerror]").length,
            xss: window.__ic_xss === undefined ? null : window.__ic_xss,
        }};
    }}""", NEEDLE)


def close_dialogs(pg):
    pg.keyboard.press("Escape")
    pg.evaluate("""() => {
        for (const d of document.querySelectorAll(".comfy-modal")) d.style.display = "none";
        for (const b of document.querySelectorAll(".p-dialog-close-button, .p-dialog-header-close")) b.click();
    }""")
    pg.wait_for_timeout(300)


def test_markup_in_mask_words_is_shown_as_text_and_runs_nothing(page, ui_server):  # noqa: F811
    name = "kv_inject_masked"
    drop_workflow(page, name)
    graph = for_test_model(load_api_workflow(name), "small")
    for nid in nodes_of(graph, "ICDDIMInvert"):
        graph[nid]["inputs"].update(steps=2, refine_iters=1)
    (kv,) = nodes_of(graph, "ICKVInject")
    graph[kv]["inputs"]["mask_words"] = WORDS
    assert not set_widgets(page, graph)
    assert not live_state(page)["dialogs"]
    assert not page.evaluate(f"needle => ({SHOWN_JS})(needle) !== null", NEEDLE)
    wait_until_unblocked(page)
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as resp_info:
        page.locator("#queue-button:visible, [data-testid='queue-button']:visible").first.click()
    response = resp_info.value
    assert response.status == 200, response.text()
    assert json.loads(response.request.post_data)["prompt"][kv]["inputs"]["mask_words"] == WORDS
    entry = ui_server.wait(response.json()["prompt_id"], timeout=240)
    assert entry["status"]["status_str"] == "error", entry["status"]
    # the frontend shows the pack's message
    # (the 0.3x frontend first shows a toast "<node> failed" with a "View details" button, which opens the message)
    details = page.get_by_role("button", name="View details")
    page.wait_for_function(f"needle => ({SHOWN_JS})(needle) !== null || [...document.querySelectorAll('button')]"
                           ".some(b => b.textContent.trim() === 'View details')", arg=NEEDLE, timeout=30_000)
    if details.count():
        details.first.click()
    try:
        page.wait_for_function(f"needle => ({SHOWN_JS})(needle) !== null", arg=NEEDLE, timeout=30_000)
    except Exception:
        page.screenshot(path="/tmp/ic_escaping_fail.png")
        raise
    page.wait_for_timeout(500)   # an <img src=x> would have failed to load and fired onerror by now
    report = shown_report(page)
    shown = report["text"]
    measured(f"\nshown in {report['where']}: {shown[:600]!r}")
    # the words, as text: the 2024-03 dialog decodes the escaped message back to the typed characters (innerHTML);
    # the 0.3x frontend shows the message's characters as they are, so the escaped form is what it shows
    assert (MARKUP if "comfy-modal" in report["where"] else MARKUP.replace("<", "&lt;").replace(">", "&gt;")) \
        in shown, (report["where"], shown)
    assert report["xss"] is None, report
    assert not report["imgs"] and report["onerror_imgs"] == 0, report
    # control: the same markup written unescaped into the same container with innerHTML makes the element and runs it
    page.evaluate(f"""([needle, markup]) => {{
        const p = document.createElement("p");
        ({SHOWN_JS})(needle).appendChild(p);
        p.innerHTML = markup;
    }}""", [NEEDLE, MARKUP])
    page.wait_for_function("window.__ic_xss === 1", timeout=10_000)
    control = shown_report(page)
    assert control["xss"] == 1 and control["imgs"] and control["onerror_imgs"] == 1, control
    page.evaluate("() => { delete window.__ic_xss; "
                  "document.querySelectorAll('img[onerror]').forEach(i => i.remove()); }")
    close_dialogs(page)
    if "comfy-modal" in report["where"]:
        # 2024-03: the frontend's own error path, given the message unescaped (an execution_error event as the
        # websocket delivers it), makes the element and runs the script: the pack's escaping is what prevents it
        page.evaluate("""async markup => {
            const {api} = await import("/scripts/api.js");
            api.dispatchEvent(new CustomEvent("execution_error", {detail: {prompt_id: "control", node_id: "8",
                node_type: "ICKVInject", executed: [], exception_type: "InversionChainError",
                exception_message: "unescaped " + markup, traceback: [], current_inputs: {}, current_outputs: {}}}));
        }""", MARKUP)
        page.wait_for_function("window.__ic_xss === 1", timeout=10_000)
        page.evaluate("() => { delete window.__ic_xss; }")
        close_dialogs(page)
