# The KVM probe's firmware (vm_image/kvm_probe.py): reset vector -> protected mode -> long mode,
# a stage letter on COM1 at each step, then the marker and an exit through isa-debug-exit.
# Build: as --64 -o probe.o kvm_probe_firmware.S && ld -e 0xf0000 -Ttext=0xf0000 --oformat binary -o probe.bin probe.o
# (tests/test_kvm_probe.py rebuilds it and compares with the bytes kvm_probe.py carries)
    .set MARKER, 0xfe00              # where kvm_probe.py writes the NUL-terminated marker
    .text
    .code16
_start:                              # image offset 0 = 0xF0000 (and 0xFFFF0000)
    cli
    cld
    mov $0x3f8, %dx
    mov $'R', %al                    # real mode runs
    out %al, %dx
    lgdtl %cs:(gdt_desc - _start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $pm32
    .code32
pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $'P', %al                    # 32-bit protected mode runs
    out %al, %dx
    mov $0x1000, %edi                # identity-map the first 2 MiB: PML4 0x1000, PDPT 0x2000, PD 0x3000
    xor %eax, %eax
    mov $0xc00, %ecx
    rep stosl
    movl $0x2003, 0x1000
    movl $0x3003, 0x2000
    movl $0x83, 0x3000
    mov $0x1000, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax                   # PAE
    mov %eax, %cr4
    mov $0xc0000080, %ecx            # EFER.LME
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax             # paging on: long mode
    mov %eax, %cr0
    ljmp $0x18, $lm64
    .code64
lm64:
    mov $0x3f8, %dx                  # (rdmsr overwrote %edx)
    mov $'L', %al                    # 64-bit long mode runs, with paging
    out %al, %dx
    mov $(0xf0000 + MARKER), %esi
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $0x10, %al
    out %al, $0xf4                   # isa-debug-exit: QEMU exits with status (0x10 << 1) | 1
3:  hlt
    jmp 3b
    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff         # 0x08: 32-bit code, flat
    .quad 0x00cf92000000ffff         # 0x10: data, flat
    .quad 0x00af9a000000ffff         # 0x18: 64-bit code
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
    .org MARKER
    .fill 64, 1, 0
    .org 0xfff0
    .code16
    jmp _start                       # the reset vector, F000:FFF0
    .org 0x10000
