"""Remote mode: where the server is and the user's token, kept in Slicer's settings (never in the scene, which
is shared and saved with the images), a connection test, and what a server's refusal means for the user.

``store`` is anything with QSettings' ``value(key, default)`` and ``setValue(key, value)``: Slicer's own
``qt.QSettings()`` in the application. No Qt and no torch here: the client is imported when it is used.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "MemorizingSAM/"


@dataclass(frozen=True)
class RemoteSettings:
    url: str = ""
    token: str = ""
    ca_file: str = ""  # a CA or self-signed certificate to trust (PEM); empty: the system's store

    @property
    def enabled(self) -> bool:
        return bool(self.url.strip())


def load_settings(store) -> RemoteSettings:
    def get(key: str) -> str:
        v = store.value(PREFIX + key, "")
        return "" if v is None else str(v)

    return RemoteSettings(get("ServerURL"), get("ServerToken"), get("ServerCAFile"))


def save_settings(store, settings: RemoteSettings) -> None:
    store.setValue(PREFIX + "ServerURL", settings.url.strip())
    store.setValue(PREFIX + "ServerToken", settings.token.strip())
    store.setValue(PREFIX + "ServerCAFile", settings.ca_file.strip())


def make_client(settings: RemoteSettings):
    from MemorizingSAMLib.client import RemoteSession

    return RemoteSession(settings.url.strip(), settings.token.strip() or None, ca_file=settings.ca_file or None)


def explain(error: BaseException, url: str = "") -> str:
    """One sentence a user can act on, for what a remote call raised."""
    status = getattr(error, "status", None)
    where = url or "the server"
    if status == 401:
        return f"{where} refused the token (401): check the token in the module's remote settings."
    if status == 503:
        retry = getattr(error, "retry_after", None)
        later = f" Try again in {retry:.0f} s." if retry else " Try again shortly."
        return f"{where} is saturated or full (503): {error}.{later}"
    if status == 413:
        return f"{where} refused the volume as too large (413): {error}"
    if status == 0:
        text = str(error)
        if "TLS" in text or "certificate" in text:
            return (
                f"{where}: the secure connection failed; set the server's certificate in the remote settings. ({text})"
            )
        return f"cannot reach {where}: is the server running and the address right? ({text})"
    return str(error)


def check_connection(settings: RemoteSettings) -> tuple[bool, str]:
    """(ok, message) after asking the server who it is: the model, where it runs, how busy it is."""
    if not settings.enabled:
        return False, "No server URL: clicks run locally."
    try:
        info = make_client(settings).info()
    except ValueError as e:  # a malformed URL
        return False, str(e)
    except Exception as e:  # RemoteError: refused, unreachable, TLS
        return False, explain(e, settings.url)
    return True, (
        f"Connected to {settings.url}: {info.get('model')} on {info.get('device')}, "
        f"{info.get('sessions')} sessions, {info.get('queue', 0)} requests queued"
    )
