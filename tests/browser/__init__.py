"""Helpers for the real-browser tests: a throwaway JupyterLab server and headless Debian Chromium via Playwright."""
