"""The view of runs in a browser: live during a run (`runners.run --live`), of finished or
crashed runs (`tools.view`), and as one self-contained file (`tools.report`).

`state` is the pure model (result rows -> the JSON the page reads), `server` the aiohttp
server around it, `page` the page itself (plain HTML, CSS and JavaScript drawing SVG; no
build step, nothing fetched from the network). docs/live.md describes all three.

Owns only the view: it reads result rows and serves them; it never drives a run. `state`
and `page` are pure (no asyncio, no IO beyond the package's own page file); `server` may
import aiohttp and runs in a thread of its own. It may import `testbed.results.write` (the names
of the result files); nothing of the system under test or the harness.
"""
