"""Render a survfuse report.html in headless Chromium: check every figure and screenshot every
section.

    .venv/bin/python scripts/render_report.py RUN_DIR/report.html OUT_DIR

Writes OUT_DIR/render.json (per <img>: alt text, decoded size, shown width, the fraction of
non-background pixels and of coloured pixels, as the browser drew it; per <h2>: title and
offset) and OUT_DIR/section_NN.png, one screenshot per section at a 1100 px wide window. The
report itself has no script: a copy with a probe script appended is what the browser loads.
Needs Debian's chromium (`apt-get install -y chromium`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

WIDTH = 1100
MAX_SHOT = 7000  # px: taller sections are cut (the browser's window limit)

# In the browser: per image, draw it on a canvas and count pixels that are not near-white
# (ink) and pixels whose channels differ by more than 40 (coloured: data lines, bands, bars).
PROBE = """<script>
// With #sN in the address, keep only section N (its heading to the next <h2>) at the top.
if (location.hash) {
  let keep = false;
  for (const el of [...document.body.children]) {
    if (el.tagName === 'H2') keep = '#' + el.id === location.hash;
    if (!keep) el.remove();
  }
}
window.addEventListener('load', () => {
  const images = [...document.querySelectorAll('img')].map(im => {
    const c = document.createElement('canvas');
    c.width = im.naturalWidth; c.height = im.naturalHeight;
    const g = c.getContext('2d'); g.drawImage(im, 0, 0);
    const d = g.getImageData(0, 0, Math.max(c.width, 1), Math.max(c.height, 1)).data;
    let ink = 0, colour = 0;
    for (let k = 0; k < d.length; k += 4) {
      const r = d[k], gg = d[k + 1], b = d[k + 2];
      if (r < 240 || gg < 240 || b < 240) ink++;
      if (Math.max(r, gg, b) - Math.min(r, gg, b) > 40) colour++;
    }
    const box = im.getBoundingClientRect(), n = d.length / 4;
    return {alt: im.alt, width: im.naturalWidth, height: im.naturalHeight,
            shown_width: box.width, top: box.top + window.scrollY,
            ink: ink / n, colour: colour / n};
  });
  const sections = [...document.querySelectorAll('h2')].map(h => ({
    id: h.id, title: h.textContent, top: h.getBoundingClientRect().top + window.scrollY}));
  const out = document.createElement('pre');
  out.id = 'render-probe'; out.style.display = 'none';
  out.textContent = JSON.stringify({images, sections,
    page_height: document.documentElement.scrollHeight,
    page_width: document.documentElement.scrollWidth});
  document.body.appendChild(out);
});
</script>"""


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("headless Chromium not found (apt-get install -y chromium)")


def _chromium(args: list[str], profile: Path, timeout: float = 120.0) -> str:
    cmd = [
        browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


def render(report: Path, out: Path) -> dict[str, Any]:
    """Probe `report` in Chromium and screenshot each section into `out`; returns the probe."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        page.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
        dom = _chromium(
            [f"--window-size={WIDTH},1200", "--virtual-time-budget=10000", "--dump-dom",
             page.as_uri()],
            Path(tmp) / "profile",
        )  # fmt: skip
        m = re.search(r'<pre id="render-probe"[^>]*>(.*?)</pre>', dom, re.S)
        if not m:
            raise RuntimeError(f"{report}: the probe did not run in the browser")
        probe: dict[str, Any] = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
        tops = [s["top"] for s in probe["sections"]] + [probe["page_height"]]
        for i, sec in enumerate(probe["sections"]):
            height = int(min(MAX_SHOT, max(200, tops[i + 1] - tops[i] + 60)))
            shot = out / f"section_{i:02d}.png"
            _chromium(
                [f"--window-size={WIDTH},{height}", f"--screenshot={shot}",
                 f"{page.as_uri()}#{sec['id']}"],
                Path(tmp) / "profile",
            )  # fmt: skip
            sec["screenshot"] = shot.name
    (out / "render.json").write_text(json.dumps(probe, indent=1))
    return probe


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: render_report.py REPORT_HTML OUT_DIR")
    result = render(Path(sys.argv[1]).resolve(), Path(sys.argv[2]))
    for img in result["images"]:
        print(f"{img['alt']:<40} {img['width']}x{img['height']}  ink {img['ink']:.3f}  "
              f"colour {img['colour']:.4f}")  # fmt: skip
    for sec in result["sections"]:
        print(f"{sec['screenshot']}  {sec['title']}")
