"""Example tools module: run it with ``BRIDGE_TOOLS=examples.tools_example`` and
``BRIDGE_SESSION_HOOK=examples.tools_example:persona``.

Each ``@tool`` function is offered to the agent. Its docstring's first paragraph tells the model
when to call it, the ``Args:`` section describes each parameter, and the type annotations become
the JSON Schema the model must follow. A ``CallContext`` parameter is filled in by the bridge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bridge.agent.tools import tool
from bridge.call.context import CallContext
from bridge.call.persona import PersonaOverride

# Stand-ins for your database or CRM.
ORDERS = {
    "A-1042": ("shipped", "Thursday"),
    "A-2077": ("processing", "next week"),
}
CUSTOMERS = {"+14155550100": "Ada"}


@dataclass(frozen=True)
class Booking:
    day: str
    time: str
    notes: str | None
    phone: str


BOOKINGS: list[Booking] = []


@tool
async def get_order_status(order_id: str, context: CallContext) -> dict[str, str]:
    """Look up the delivery status of one of the caller's orders.

    Args:
        order_id: The order number, e.g. "A-1042". Ask the caller for it if you do not have it.
    """
    found = ORDERS.get(order_id.strip().upper())
    if found is None:
        # Raising sends {"error": "LookupError: ..."} to the model, which reads it verbatim.
        raise LookupError(f"no order {order_id!r}; ask the caller to read the number again")
    status, eta = found
    return {"order_id": order_id, "status": status, "expected": eta, "caller": context.from_number}


@tool
def book_appointment(
    day: Literal["monday", "tuesday", "wednesday", "thursday", "friday"],
    time: str,
    context: CallContext,
    notes: str | None = None,
) -> Booking:
    """Book an appointment for the caller. Confirm the day and time with them first.

    Args:
        day: The weekday of the appointment.
        time: The time of day in 24-hour form, e.g. "14:30".
        notes: Anything the caller wants the staff to know.
    """
    # A plain (sync) tool runs in a worker thread, so a blocking database call is fine here.
    booking = Booking(day=day, time=time, notes=notes, phone=context.from_number)
    BOOKINGS.append(booking)
    return booking  # a dataclass: sent to the model as JSON


async def persona(context: CallContext) -> PersonaOverride | None:
    """Session hook: greet known callers by name; everyone else gets the default persona."""
    name = CUSTOMERS.get(context.from_number)
    if name is None:
        return None
    return PersonaOverride(
        greeting=f"Hi {name}, welcome back! How can I help today?",
        system_prompt=(
            f"You are Acme's phone assistant, speaking with {name}, a returning customer. "
            "Keep every answer to one or two short sentences."
        ),
        tools=["get_order_status", "book_appointment"],
    )
