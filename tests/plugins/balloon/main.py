blocks = []
while True:
    blocks.append(bytearray(4 * 1024 * 1024))
