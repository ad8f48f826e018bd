/* nothing: exit 0 at once. Built dynamic (nothing64), 32-bit (nothing32) and static
 * (nothing-static): the programs `vgpu-launch doctor --check` judges by their ELF header. */
int main(void) { return 0; }
