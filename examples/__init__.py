"""Runnable example apps; ``meshflow dev`` serves ``examples:apps``."""

from .pipeline import app as docs_app
from .signup import app as shop_app

apps = [shop_app, docs_app]
