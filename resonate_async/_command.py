"""The base class of commands: the small requests that batch handlers serve."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic

if TYPE_CHECKING:
    # PEP 696 defaults let a bare ``Command`` mean ``Command[Any]`` even under
    # ``mypy --strict``. Only the type checker needs them; at run time the
    # standard TypeVar is enough, so typing_extensions is not a dependency.
    from typing_extensions import TypeVar

    R = TypeVar("R", covariant=True, default=Any)
else:
    from typing import TypeVar

    R = TypeVar("R", covariant=True)

__all__ = ("Command",)


class Command(Generic[R]):
    """Base class for a command: a dataclass that a batch handler serves.

    Subclass it with a ``@dataclass`` whose fields are the command's
    arguments. The type parameter is the result that ``ctx.lfc`` returns for
    the command; a bare ``Command`` means ``Command[Any]``. Commands of one
    type issued by many workflows are grouped into one call of the handler
    registered with ``Resonate.register_command_handler``.

    A command is stored as its fields plus its registered type name, so its
    fields must be encodable (see ``resonate_async.JSONEncoder``) and
    the class must be defined at module level.

    Example:
        ```python
        @dataclass
        class InsertUser(Command[int]):
            id: int

        async def create_user(ctx: Context, user_id: int) -> int:
            return await ctx.lfc(InsertUser(user_id))  # typed as int
        ```
    """

    __slots__ = ()
