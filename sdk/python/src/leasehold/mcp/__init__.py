"""The MCP gateway (`leasehold-mcp`; `pip install 'leasehold[mcp]'`)."""
