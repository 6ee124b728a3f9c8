"""Runnable example apps; ``meshflow dev`` serves ``examples:apps``."""

from .approval import app as finance_app
from .csv_import import app as imports_app
from .digest import app as digest_app
from .pipeline import app as docs_app
from .signup import app as shop_app

apps = [shop_app, docs_app, finance_app, digest_app, imports_app]
