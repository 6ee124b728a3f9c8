"""meshflow: durable, event-driven functions for Python on NATS JetStream."""

from .client import Client as Client
from .client import Run as Run
from .client import StepInfo as StepInfo
from .client import connect as connect
from .connection import NatsAuth as NatsAuth
from .errors import ConfigError as ConfigError
from .errors import DurationError as DurationError
from .errors import EventError as EventError
from .errors import MeshflowError as MeshflowError
from .errors import NatsError as NatsError
from .errors import NestedStepError as NestedStepError
from .errors import NonDeterminismError as NonDeterminismError
from .errors import NonRetriableError as NonRetriableError
from .errors import RetryAfterError as RetryAfterError
from .errors import RunNotFoundError as RunNotFoundError
from .errors import RunTimeoutError as RunTimeoutError
from .errors import SerializationError as SerializationError
from .errors import StateError as StateError
from .errors import StepError as StepError
from .events import Event as Event
from .flow.config import Batch as Batch
from .flow.config import Concurrency as Concurrency
from .flow.config import Debounce as Debounce
from .flow.config import Priority as Priority
from .flow.config import RateLimit as RateLimit
from .flow.config import Singleton as Singleton
from .flow.config import Throttle as Throttle
from .functions import App as App
from .functions import Cancel as Cancel
from .functions import Function as Function
from .functions import Timeouts as Timeouts
from .functions import TriggerCron as TriggerCron
from .functions import TriggerEvent as TriggerEvent
from .logs import LogRecord as LogRecord
from .retries import Retry as Retry
from .runs import Attempt as Attempt
from .runs import RunStatus as RunStatus
from .steps import Context as Context
from .steps import Step as Step
from .steps import WaitFor as WaitFor
from .worker import Worker as Worker

__all__ = [
    "App",
    "Attempt",
    "Batch",
    "Cancel",
    "Client",
    "Concurrency",
    "ConfigError",
    "Context",
    "Debounce",
    "DurationError",
    "Event",
    "EventError",
    "Function",
    "LogRecord",
    "MeshflowError",
    "NatsAuth",
    "NatsError",
    "NestedStepError",
    "NonDeterminismError",
    "NonRetriableError",
    "Priority",
    "RateLimit",
    "Retry",
    "RetryAfterError",
    "Run",
    "RunNotFoundError",
    "RunStatus",
    "RunTimeoutError",
    "SerializationError",
    "Singleton",
    "StateError",
    "Step",
    "StepError",
    "StepInfo",
    "Throttle",
    "Timeouts",
    "TriggerCron",
    "TriggerEvent",
    "WaitFor",
    "Worker",
    "connect",
]
