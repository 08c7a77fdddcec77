//! The page path: a process's memory, from the mappings of the captured process to the pages
//! of the restored one, laid out along the way it travels.
//!
//! * `layout` — which mappings exist and how they are backed: captured from /proc, checked,
//!   created again at restore and given their final protection;
//! * `scan` — which pages travel (present or swapped, and of a private file only the ones
//!   the process wrote);
//! * `send` — how they leave the captured process: read here, or handed over by the process
//!   itself onto the image's socket or into a pipe (`send::send`, one `PageRoute` each);
//! * `place` — how they enter the new process: written in by the restorer (through its
//!   userfaultfd, into huge pages where whole blocks come), or received by the process itself
//!   off the image's socket (`place::place`, one `Placement` each).
//!
//! Capture calls `layout::capture` and then `send`; restore calls `layout::validate`,
//! `layout::create`, `Placer::open`, `place` and `layout::finish`. Between `send` and
//! `place` the pages are page records of the image (telefork_image), each run one record,
//! announced by the image's page index where the other side can use it.
//!
//! Dependencies run one way, along the path: `send` uses `scan`, and `scan`, `send` and
//! `place` use `layout`; inside `send/` and `place/` a route uses its siblings (the channel,
//! the reader, the userfaultfd, the writer), never the module above it.

pub mod layout;
pub mod place;
pub mod scan;
pub mod send;

pub use layout::PAGE;
pub use place::{is_big, place, PagesSocket, Placed, Placement, Placer};
pub use send::{send, PageRoute};
