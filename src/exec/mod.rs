//! Tool files, registry, runner and job store: everything that runs commands,
//! independent of HTTP and of the tailnet.
