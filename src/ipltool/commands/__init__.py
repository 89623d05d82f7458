"""One module per `ipl` subcommand; each parses flags, calls the library, renders the result."""
