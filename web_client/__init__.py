"""The web client (``pollinate.js``) and the demo page, shipped as package data.

Nothing here is Python: this file makes the folder a package so that an installed Pollinate
carries the page, its scripts and the TF.js files vendored into ``vendor/tfjs/`` (see
``vendor.json``), and so that ``server/web_assets.py`` finds them with ``importlib``.
"""
