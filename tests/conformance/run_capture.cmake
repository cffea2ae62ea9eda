# Captures one machine state from a real QEMU with `mtree capture` and checks
# the round trip: the fixture imported from QEMU's text must print QEMU's
# `info mtree -f`, `info mtree -D` and `info mtree -o -D` (compare_*.py rule).
#   cmake -DMTREE=<mtree> -DPYTHON=<python3> -DSECONDS=<n> -DCOMMAND=<qemu command line>
#         -DOUT=<dir> [-DCOMMITTED=<qemu-7.2/NAME>] [-DRUNNING=ON] -P run_capture.cmake
# With COMMITTED and SECONDS 0 (a machine at reset, which is deterministic),
# the fresh texts must also equal the committed ones.
# With RUNNING (SECONDS 0 only), the QEMU is one `mtree capture --qmp` finds
# running: this script starts it (-daemonize, stopped at reset, a QMP socket
# in OUT), and after the capture requires it to be still running (the
# capture must leave a QEMU it did not start alone), then stops it by its pid.
foreach(var MTREE PYTHON SECONDS COMMAND OUT)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_capture.cmake: -D${var}=... is required")
  endif()
endforeach()

file(REMOVE_RECURSE ${OUT})
separate_arguments(qemu UNIX_COMMAND "${COMMAND}")
if(RUNNING)
  if(NOT SECONDS EQUAL 0)
    message(FATAL_ERROR "run_capture.cmake: RUNNING captures a QEMU at reset (SECONDS 0)")
  endif()
  file(MAKE_DIRECTORY ${OUT})
  set(pidfile ${OUT}/qemu.pid)
  set(socket ${OUT}/qmp.sock)
  # -daemonize: QEMU returns once it is set up (its QMP socket listening).
  execute_process(COMMAND ${qemu} -display none -S -nic none -daemonize -pidfile ${pidfile}
      -qmp unix:${socket},server=on,wait=off
    RESULT_VARIABLE result ERROR_VARIABLE qemu_error TIMEOUT 60)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "QEMU did not start (${result}): ${COMMAND}\n${qemu_error}")
  endif()
  file(STRINGS ${pidfile} pid LIMIT_COUNT 1)
  execute_process(COMMAND ${MTREE} capture --out ${OUT} --qmp ${socket} --timeout 60
    RESULT_VARIABLE capture_result TIMEOUT 120)
  execute_process(COMMAND kill -0 ${pid} RESULT_VARIABLE alive)
  execute_process(COMMAND kill ${pid} TIMEOUT 10)
  if(NOT capture_result EQUAL 0)
    message(FATAL_ERROR "mtree capture --qmp failed (${capture_result}): ${COMMAND}")
  endif()
  if(NOT alive EQUAL 0)
    message(FATAL_ERROR "the QEMU (pid ${pid}) was gone after mtree capture --qmp")
  endif()
else()
  set(capture ${MTREE} capture --out ${OUT} --timeout 60)
  if(NOT SECONDS EQUAL 0)
    list(APPEND capture --run ${SECONDS})
  endif()
  execute_process(COMMAND ${capture} -- ${qemu} RESULT_VARIABLE result TIMEOUT 150)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "mtree capture failed (${result}): ${COMMAND}")
  endif()
endif()

function(compare script expected actual)
  execute_process(COMMAND ${PYTHON} ${CMAKE_CURRENT_LIST_DIR}/${script} ${expected} ${actual}
    RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "differs: expected ${expected}, got ${actual}")
  endif()
endfunction()

foreach(mode IN ITEMS flat tree owners)
  if(mode STREQUAL "flat")
    set(args "")
    set(expected mtree-f.txt)
    set(script compare_flatviews.py)
  elseif(mode STREQUAL "tree")
    set(args --tree)
    set(expected mtree-D.txt)
    set(script compare_mtree_tree.py)
  else()
    set(args --tree --owner)
    set(expected mtree-oD.txt)
    set(script compare_mtree_tree.py)
  endif()
  execute_process(COMMAND ${MTREE} ${args} ${OUT}/fixture.json
    OUTPUT_FILE ${OUT}/qomem-${mode}.txt RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "mtree ${args} ${OUT}/fixture.json failed (${result})")
  endif()
  compare(${script} ${OUT}/${expected} ${OUT}/qomem-${mode}.txt)
  if(DEFINED COMMITTED AND SECONDS EQUAL 0)
    compare(${script} ${COMMITTED}/${expected} ${OUT}/${expected})
  endif()
endforeach()
