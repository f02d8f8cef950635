"""The view of runs in a browser: live during a run (`runners.run --live`), of finished or
crashed runs (`tools.view`), and as one self-contained file (`tools.report`).

`state` is the pure model (result rows -> the JSON the page reads), `server` the aiohttp
server around it, `page` the page itself (plain HTML, CSS and JavaScript drawing SVG; no
build step, nothing fetched from the network). docs/live.md describes all three.
"""
