"""The call and its wire: what one request is (`model`: the options, the prepared request, the
`Completion`), the one place that builds a body and reads an answer per endpoint kind (`wire`,
`answers`), the `Call` that sends one and reads it (`call`), the answer as data (`schema`,
`jsonschema`) and tools (`tools`), and the subscribers told about every call (`hooks`)."""
