"""What the machine does under every room: whole-or-nothing files, faults, memory, the allocator, float32 precision, a quiet terminal."""
