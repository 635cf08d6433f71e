"""Light and dark looks that follow the system colour scheme, and the page icons.

    dark = apply_theme(app)                 # Fusion style + palette + a small stylesheet
    button.setIcon(icon("run", dark))       # resources/icons/run.svg drawn in the text colour
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QByteArray, QRectF, Qt
from PySide6.QtGui import QColor, QGuiApplication, QIcon, QPainter, QPalette, QPixmap
from PySide6.QtSvg import QSvgRenderer

import cpt_studio.resources as _resources

ICON_DIR = Path(_resources.__file__).parent / "icons"

LIGHT = {"window": "#f4f4f5", "base": "#ffffff", "text": "#18181b", "muted": "#71717a", "accent": "#2563eb",
         "side": "#e4e4e7", "error_bg": "#fee2e2", "error_fg": "#7f1d1d", "info_bg": "#dbeafe",
         "info_fg": "#1e3a8a", "ok": "#15803d"}
DARK = {"window": "#202024", "base": "#18181b", "text": "#e4e4e7", "muted": "#a1a1aa", "accent": "#60a5fa",
        "side": "#2a2a30", "error_bg": "#4c1d1d", "error_fg": "#fecaca", "info_bg": "#1e293b",
        "info_fg": "#bfdbfe", "ok": "#4ade80"}


def system_is_dark(app: QGuiApplication | None = None) -> bool:
    """The desktop's colour scheme (Qt >= 6.5), else a guess from the default palette."""
    app = app or QGuiApplication.instance()
    scheme = app.styleHints().colorScheme()
    if scheme != Qt.ColorScheme.Unknown:
        return scheme == Qt.ColorScheme.Dark
    return app.palette().window().color().lightness() < 128


def colors(dark: bool) -> dict:
    return DARK if dark else LIGHT


def palette(dark: bool) -> QPalette:
    c = colors(dark)
    pal = QPalette()
    role = QPalette.ColorRole
    for r, key in ((role.Window, "window"), (role.Base, "base"), (role.AlternateBase, "window"),
                   (role.Button, "window"), (role.Text, "text"), (role.WindowText, "text"),
                   (role.ButtonText, "text"), (role.ToolTipText, "text"), (role.ToolTipBase, "base"),
                   (role.PlaceholderText, "muted"), (role.Highlight, "accent"), (role.Link, "accent")):
        pal.setColor(r, QColor(c[key]))
    pal.setColor(role.HighlightedText, QColor("#ffffff"))
    for r in (role.Text, role.WindowText, role.ButtonText):
        pal.setColor(QPalette.ColorGroup.Disabled, r, QColor(c["muted"]))
    return pal


def stylesheet(dark: bool) -> str:
    c = colors(dark)
    return f"""
QListWidget#sidebar {{ background: {c['side']}; border: none; padding-top: 8px; outline: 0; }}
QListWidget#sidebar::item {{ padding: 10px 6px; border-radius: 6px; margin: 2px 6px; border: none; }}
QListWidget#sidebar::item:selected, QListWidget#sidebar::item:selected:!active {{
    background: {c['accent']}; color: white; }}
QLabel#muted {{ color: {c['muted']}; }}
QLabel#pageTitle {{ font-size: 15pt; font-weight: 600; }}
QLabel#badge {{ border-radius: 8px; padding: 2px 8px; color: {c['muted']}; border: 1px solid {c['muted']}; }}
QLabel#badge[on="true"] {{ color: {c['ok']}; border-color: {c['ok']}; }}
QFrame#banner {{ border-radius: 6px; border: none; }}
QFrame#banner[level="error"] {{ background: {c['error_bg']}; }}
QFrame#banner[level="error"] QLabel {{ color: {c['error_fg']}; }}
QFrame#banner[level="info"] {{ background: {c['info_bg']}; }}
QFrame#banner[level="info"] QLabel {{ color: {c['info_fg']}; }}
QLabel#bannerTitle {{ font-weight: 600; }}
QPushButton#primary:enabled {{ background: {c['accent']}; color: white; border: none; border-radius: 4px;
                               padding: 5px 14px; font-weight: 600; }}
"""


def apply_theme(app, dark: bool | None = None) -> bool:
    """Fusion + the light or dark palette + stylesheet; returns whether dark was applied."""
    dark = system_is_dark(app) if dark is None else dark
    app.setStyle("Fusion")
    app.setPalette(palette(dark))
    app.setStyleSheet(stylesheet(dark))
    return dark


def icon(name: str, dark: bool = False, color: str | None = None) -> QIcon:
    """A page icon from resources/icons/<name>.svg, drawn in the theme's text colour."""
    path = ICON_DIR / f"{name}.svg"
    if not path.is_file():
        return QIcon()
    text = path.read_text(encoding="utf-8")
    result = QIcon()
    for mode, col in ((QIcon.Mode.Normal, color or colors(dark)["text"]), (QIcon.Mode.Selected, "#ffffff")):
        renderer = QSvgRenderer(QByteArray(text.replace("currentColor", col).encode("utf-8")))
        for size in (16, 24, 32, 48, 64):
            pix = QPixmap(size, size)
            pix.fill(Qt.GlobalColor.transparent)
            painter = QPainter(pix)
            renderer.render(painter, QRectF(0, 0, size, size))
            painter.end()
            result.addPixmap(pix, mode)
    return result
